# athena_deferred: built with PGXS
PG_CONFIG ?= pg_config
MODULE_big = athena_deferred
OBJS = src/athena_deferred.o src/enqueue.o src/entry.o src/queue.o src/wal_format.o src/wal.o src/launcher.o src/worker.o src/recovery.o src/flush.o src/notify.o src/monitor.o

EXTENSION = athena_deferred
DATA = athena_deferred--0.1.0.sql athena_deferred--0.1.0--0.2.0.sql athena_deferred--0.2.0--0.3.0.sql

# the server headers are not -Wextra clean: treat them as system headers
PG_CPPFLAGS = -isystem $(shell $(PG_CONFIG) --includedir-server) -Wall -Wextra -Werror
SHLIB_LINK = -ljansson

# pg_regress and isolation tests run in a temporary instance with the
# library preloaded (test/*.conf)
# init installs the extension; the others each test one behaviour
REGRESS = init insert update_delete transactions validation privileges entry_isolation values immediate ddl copy_path cached_plans target_cache operable
REGRESS_OPTS = --temp-instance=tmp_regress --temp-config=test/regress.conf
ISOLATION = $(patsubst specs/%.spec,%,$(sort $(wildcard specs/*.spec)))
ISOLATION_OPTS = --temp-instance=tmp_isolation --temp-config=test/isolation.conf
TAP_TESTS = 1


PGXS := $(shell $(PG_CONFIG) --pgxs)
include $(PGXS)

# every part includes the shared headers: rebuild all when they change
# (PGXS does not track header dependencies)
$(OBJS): src/athena_deferred.h src/wal_format.h

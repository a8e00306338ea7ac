/*-------------------------------------------------------------------------
 *
 * entry.c
 *		The entry format (see DeferredEntry): building one, used by the calls,
 *		which serialize what they validated, and by recovery, which rebuilds
 *		entries from WAL records; and turning one back into the payload a
 *		user would pass, for dead letters and deferred_pending().
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "athena_deferred.h"

/*
 * Append len bytes that the caller fills in later.  Not
 * appendStringInfoSpaces(), which stores them one by one: on the call path
 * that showed in profiles.
 */
static void
append_room(StringInfo buf, int len)
{
	enlargeStringInfo(buf, len);
	memset(buf->data + buf->len, 0, len);
	buf->len += len;
	buf->data[buf->len] = '\0';
}

/* Start an entry: room for the header, filled in by the caller */
void
entry_begin(StringInfo buf)
{
	initStringInfo(buf);
	append_room(buf, sizeof(DeferredEntry));
}

/* The same in a buffer used before, keeping its memory */
void
entry_reset(StringInfo buf)
{
	resetStringInfo(buf);
	append_room(buf, sizeof(DeferredEntry));
}

/*
 * Append one part: its header and its JSON text, zero-padded to MAXALIGN,
 * so that the entry's size (buf->len) is always MAXALIGNed.  The text's
 * keys are the part's columns: it must be JsonbToCString() output of the
 * validated objects (for PART_ROWS, a JSON array of objects with the same
 * keys).
 */
void
entry_add_part(StringInfo buf, DeferredPartKind kind, const char *text, int textlen)
{
	DeferredPart part;

	part.kind = kind;
	part.unused = 0;
	part.textlen = textlen;
	appendBinaryStringInfo(buf, (const char *) &part, sizeof(part));
	appendBinaryStringInfo(buf, text, textlen);
	append_room(buf, MAXALIGN(buf->len) - buf->len);
}

/* The payload as a user would pass it: {"rows": [...]} or {"match": .., "changes": ..} */
char *
entry_payload_json(const DeferredEntry *entry)
{
	const DeferredPart *part = entry_first_part(entry);
	StringInfoData buf;

	initStringInfo(&buf);
	if (entry->op == DEFERRED_INSERT)
	{
		appendStringInfoString(&buf, "{\"rows\": [");
		for (int i = 0; i < entry->nparts; i++, part = part_next(part))
		{
			/* strip each run's brackets and join the runs */
			if (i > 0)
				appendStringInfoString(&buf, ", ");
			appendBinaryStringInfo(&buf, part_text(part) + 1, part->textlen - 2);
		}
		appendStringInfoString(&buf, "]}");
	}
	else
	{
		appendStringInfoString(&buf, "{\"match\": ");
		appendBinaryStringInfo(&buf, part_text(part), part->textlen);
		if (entry->op == DEFERRED_UPDATE)
		{
			part = part_next(part);
			appendStringInfoString(&buf, ", \"changes\": ");
			appendBinaryStringInfo(&buf, part_text(part), part->textlen);
		}
		appendStringInfoChar(&buf, '}');
	}
	return buf.data;
}

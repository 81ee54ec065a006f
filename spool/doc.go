// Package spool keeps outgoing telemetry on disk until the hub has it: a bounded FIFO queue
// of messages in segment files, durable when Append returns, removed only on Ack, there
// again after a restart or a power cut. It stores and hands out; sending is the hub
// session's job, and what a message means is the applications'.
//
// # Use
//
// Applications' messages go in with Append, which returns once the message is on the medium.
// The sender takes them with Next, in append order (so in order per application), keeps a
// window of them in flight, and acknowledges each with Ack when its PUBACK comes, in any
// order. When a connection ends, Requeue makes Next hand the unacknowledged ones out again,
// first and in order. Delivery is at least once: a message may go out again after a
// reconnect or a crash, with the same "$.mid", by which a back end deduplicates. AwaitAck
// lets a caller wait for one message's PUBACK.
//
// The queue is bounded by Options.MaxBytes (the segment files) and Options.MaxAge. When a
// message does not fit, Options.WhenFull decides: RefuseNew answers ErrFull, DropOldest
// removes the oldest segment and counts its messages in Stats.Dropped.
//
// # On disk
//
// The directory (0700) holds segment files (0600) named by their first record's ID,
// <16 hex digits>.seg, the acknowledgement state "acked", and "lock", which one process at a
// time holds with flock. A segment is an 8-byte magic and records, each its body length and
// the CRC32C of length and body, then the body: ID, append time, app, properties, payload.
// The writer appends to the last segment and begins a new one at Options.SegmentBytes. Space
// comes back a segment at a time: once every record in it is acknowledged, dropped or
// expired, the file is deleted. The acknowledgement state is the ID below which every record
// is gone, in two slots a page apart that take turns.
//
// # Durability: the fsync discipline
//
// One goroutine writes. Appends that arrive while it syncs wait together for the next round
// (group commit): one write(2) and one fdatasync(2) per segment touched serve them all, and
// no timer holds a lone message back. Append returns only after:
//
//   - the batch's bytes are written and the segment fdatasync'd (data and size);
//   - for a segment begun in this batch, the directory fsync'd too, and the segment begun
//     only after the one before it was durable, so that a power cut can leave only the last
//     segment with a torn tail.
//
// Removing segments: the acknowledgement state is saved and fdatasync'd first (IDs then
// never go back after a power cut), then the files are unlinked and the directory fsync'd
// once for all of them. A removal lost to a power cut brings acknowledged records back,
// which are sent again: a duplicate, never a loss.
//
// Acknowledgements: the mark is written to the page cache as it moves (a killed process
// loses none of it) and fdatasync'd within a second of moving, at once before a segment
// removal, and at Close. A new state file gets both slots written and synced at Open, so that
// no later save needs a block a full file system may not have. After a power cut, what is
// sent again is at most the last second's acknowledged messages, and those acknowledged out
// of order above one that was not; a slot torn by the cut leaves the other slot's older
// state, and an unreadable state sends again everything still stored. Acknowledgements are
// never needed for a message to be kept, only for it to be removed.
//
// Open recovers: a segment's tail that is not a whole record with a valid CRC is cut off
// (the last segment only, where a crash can tear it) and counted in Stats.Torn; damage
// elsewhere, which only the medium causes, is skipped to the next intact record and counted
// the same way. A file named as a segment that is not one (bad magic, records out of order)
// is renamed aside, never deleted; files of other names are left alone.
//
// A failed write or fdatasync fails every append of its batch and is undone (the segment cut
// back, a new one removed); if the undo fails too, the spool refuses appends until it is
// opened again. A full file system is ErrFull, like a full queue.
//
// Message ages come from the wall clock at Append (Options.Clock): the agent must not append
// before the clock is set, or messages appended at a clock far behind look old once it is.
package spool

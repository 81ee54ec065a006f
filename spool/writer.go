package spool

import (
	"errors"
	"fmt"
	"os"
	"syscall"
	"time"
)

// writeLoop is the one goroutine that changes the files once Open returns: it commits
// batches of appends, removes released segments and saves the acknowledgement state. Appends
// that arrive while it syncs form the next batch, so that under load one fdatasync serves many.
func (s *Spool) writeLoop() {
	defer close(s.exited)
	var (
		timerC   <-chan time.Time
		synced   = s.acks.saved
		lastSync time.Time
		idle     = true
	)
	for {
		if idle {
			select {
			case <-s.kick:
			case <-timerC:
				timerC = nil
			}
		}
		s.mu.Lock()
		b, doomed, mark, closing := s.batch, s.doomed, s.released, s.closed
		s.batch, s.doomed = nil, nil
		var active *segment
		if n := len(s.segs); n > 0 {
			active = s.segs[n-1]
		}
		s.mu.Unlock()

		if len(doomed) > 0 {
			// The mark goes to disk before the files leave, so that after a power cut the
			// next IDs never reuse those of removed records.
			s.saveAcks(mark, true)
			synced, lastSync = s.acks.saved, s.opts.Clock.Now()
			s.remove(doomed)
		}
		if b != nil {
			s.commit(b, active)
		}
		s.saveAcks(mark, false)
		if s.acks.saved != synced {
			// At most the interval, whatever the wall clock did since the last sync.
			wait := min(ackSyncInterval-s.opts.Clock.Now().Sub(lastSync), ackSyncInterval)
			if closing || wait <= 0 {
				s.saveAcks(mark, true)
				synced, lastSync = s.acks.saved, s.opts.Clock.Now()
			} else if timerC == nil {
				timerC = s.opts.Clock.After(wait)
			}
		}

		s.mu.Lock()
		more := s.batch != nil || len(s.doomed) > 0
		s.mu.Unlock()
		if closing && !more {
			return
		}
		idle = !more
	}
}

// saveAcks writes the acknowledgement mark if it moved, and with sync makes it durable.
func (s *Spool) saveAcks(mark ID, sync bool) {
	var err error
	if mark != s.acks.saved {
		err = s.acks.save(mark)
		s.countWritten(ackSlotSize)
	}
	if err == nil && sync {
		err = s.acks.sync()
	}
	if err != nil {
		s.mu.Lock()
		s.ackErr = fmt.Errorf("cannot save the acknowledgement state: %w", err)
		s.mu.Unlock()
	}
}

// remove deletes released segments. A removal the file system does not keep after a power
// cut brings released records back, to be sent again: never a loss.
func (s *Spool) remove(doomed []*segment) {
	for _, seg := range doomed {
		seg.f.Close()
		os.Remove(seg.path)
	}
	s.dirf.Sync()
}

// part is the records of one batch that go to one segment.
type part struct {
	seg    *segment // nil until created, for a new segment
	first  ID
	off    int64
	buf    []byte
	n      int
	last   ID
	newest int64
}

// commit writes a batch, makes it durable and publishes it to Next, or fails every append
// in it and undoes what was written.
func (s *Spool) commit(b *batch, active *segment) {
	var parts []*part
	size := int64(0)
	if active != nil {
		size = active.size
	}
	for i, rec := range b.recs {
		if active == nil && len(parts) == 0 || size > segmentHeader && size+int64(len(rec)) > s.opts.SegmentBytes {
			parts = append(parts, &part{first: b.ids[i], buf: []byte(segmentMagic)})
			size = segmentHeader
		} else if len(parts) == 0 {
			parts = append(parts, &part{seg: active, off: active.size})
		}
		p := parts[len(parts)-1]
		p.buf = append(p.buf, rec...)
		p.n++
		p.last = b.ids[i]
		p.newest = max(p.newest, b.times[i])
		size += int64(len(rec))
	}
	if err := s.write(parts); err != nil {
		s.undo(parts, err)
		if errors.Is(err, syscall.ENOSPC) {
			b.err = fmt.Errorf("%w: the file system is full: %w", ErrFull, err)
		} else {
			b.err = fmt.Errorf("cannot store the message: %w", err)
		}
		s.mu.Lock()
		s.reserved -= b.reserved
		s.mu.Unlock()
		close(b.done)
		return
	}

	s.mu.Lock()
	for _, p := range parts {
		seg := p.seg
		if p.off == 0 {
			s.segs = append(s.segs, seg)
			if s.cursor.seg == nil {
				s.cursor = cursor{seg: seg, off: segmentHeader, prev: max(s.cursor.prev, seg.first-1)}
			}
		}
		seg.size = p.off + int64(len(p.buf))
		seg.records += p.n
		seg.last = p.last
		seg.newest = max(seg.newest, p.newest)
		s.disk += int64(len(p.buf))
		s.counts.Written += int64(len(p.buf))
	}
	s.reserved -= b.reserved
	s.signalLocked()
	s.trimLocked() // a full segment left behind may be all acknowledged already
	s.mu.Unlock()
	close(b.done)
}

// write puts each part in its segment and makes it durable, creating new segments only once
// everything before them is durable: after a power cut, only the last segment can end torn.
func (s *Spool) write(parts []*part) error {
	created := false
	for _, p := range parts {
		if p.seg == nil {
			seg, err := createSegment(s.dir, p.first)
			if err != nil {
				return err
			}
			p.seg, created = seg, true
		}
		if _, err := p.seg.f.WriteAt(p.buf, p.off); err != nil {
			return err
		}
		if err := fdatasync(p.seg.f); err != nil {
			return err
		}
	}
	if created {
		return s.dirf.Sync()
	}
	return nil
}

// undo takes a failed batch back off the disk: the segment it extended is cut back to its
// committed size, the segments it created are removed. If that fails too, the spool refuses
// appends from then on; Open, next time, finds the tail torn and drops it.
func (s *Spool) undo(parts []*part, cause error) {
	var errs []error
	created := false
	for _, p := range parts {
		switch {
		case p.seg == nil:
		case p.off == 0:
			p.seg.f.Close()
			errs = append(errs, os.Remove(p.seg.path))
			created = true
		default:
			errs = append(errs, p.seg.f.Truncate(p.off), fdatasync(p.seg.f))
		}
	}
	if created {
		errs = append(errs, s.dirf.Sync())
	}
	if err := errors.Join(errs...); err != nil {
		s.mu.Lock()
		s.broken = fmt.Errorf("%w, and it could not be undone: %w", cause, err)
		s.mu.Unlock()
	}
}

func (s *Spool) countWritten(n int64) {
	s.mu.Lock()
	s.counts.Written += n
	s.mu.Unlock()
}

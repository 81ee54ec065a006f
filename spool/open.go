package spool

import (
	"bytes"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"syscall"
	"time"
)

const lockName = "lock"

// Open opens the spool in dir, creating it (0700) if needed, and recovers what a crash left:
// a record torn at the tail is cut off and counted in Stats.Torn; a file named as a segment
// that cannot be one is renamed aside (name.corrupt-<UTC time>) and counted in
// Stats.SetAside; other files are left alone. Messages not acknowledged before are handed
// out again. One process at a time may have a spool open (ErrLocked).
func Open(dir string, opts Options) (*Spool, error) {
	o, err := opts.resolve()
	if err != nil {
		return nil, err
	}
	dirf, err := makeDir(dir)
	if err != nil {
		return nil, fmt.Errorf("cannot create the telemetry spool %s: %w", dir, err)
	}
	lock, err := lockDir(dir)
	if err != nil {
		dirf.Close()
		return nil, err
	}
	s := &Spool{
		dir:     dir,
		dirf:    dirf,
		opts:    o,
		lock:    lock,
		waiters: make(map[ID]*waiter),
		wake:    make(chan struct{}),
		kick:    make(chan struct{}, 1),
		exited:  make(chan struct{}),
	}
	if err := s.recover(); err != nil {
		for _, seg := range s.segs {
			seg.f.Close()
		}
		if s.acks != nil {
			s.acks.f.Close()
		}
		lock.Close()
		dirf.Close()
		return nil, fmt.Errorf("cannot open the telemetry spool %s: %w", dir, err)
	}
	go s.writeLoop()
	s.kickWriter() // segments released before the crash may be waiting for removal
	return s, nil
}

// makeDir creates the spool directory, or closes one found open to others, and returns it
// open: syncing it makes file creations, renames and removals in it durable.
func makeDir(dir string) (*os.File, error) {
	if err := os.Mkdir(dir, 0o700); err == nil {
		// Its own entry in the parent, too.
		parent, err := os.Open(filepath.Dir(dir))
		if err != nil {
			return nil, err
		}
		err = parent.Sync()
		parent.Close()
		if err != nil {
			return nil, err
		}
	} else if !errors.Is(err, fs.ErrExist) {
		return nil, err
	}
	d, err := os.Open(dir)
	if err != nil {
		return nil, err
	}
	info, err := d.Stat()
	switch {
	case err != nil:
	case !info.IsDir():
		err = fmt.Errorf("%s is not a directory", dir)
	case info.Mode().Perm() != 0o700:
		err = d.Chmod(0o700)
	}
	if err != nil {
		d.Close()
		return nil, err
	}
	return d, nil
}

func lockDir(dir string) (*os.File, error) {
	f, err := openPrivate(filepath.Join(dir, lockName), os.O_RDWR|os.O_CREATE)
	if err != nil {
		return nil, fmt.Errorf("cannot open the telemetry spool lock: %w", err)
	}
	if err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB); err != nil {
		f.Close()
		if errors.Is(err, syscall.EWOULDBLOCK) {
			return nil, fmt.Errorf("%s: %w", dir, ErrLocked)
		}
		return nil, fmt.Errorf("cannot lock the telemetry spool %s: %w", dir, err)
	}
	return f, nil
}

// openPrivate opens one of the spool's own files, 0600 whatever mode it had.
func openPrivate(path string, flag int) (*os.File, error) {
	f, err := os.OpenFile(path, flag|syscall.O_NOFOLLOW, 0o600)
	if err != nil {
		return nil, err
	}
	info, err := f.Stat()
	if err == nil && !info.Mode().IsRegular() {
		err = fmt.Errorf("%s is not a regular file", path)
	}
	if err == nil && info.Mode().Perm() != 0o600 {
		err = f.Chmod(0o600)
	}
	if err != nil {
		f.Close()
		return nil, err
	}
	return f, nil
}

// recover reads the acknowledgement state and every segment, and sets the read cursor at
// the oldest record not acknowledged.
func (s *Spool) recover() error {
	ackPath := filepath.Join(s.dir, ackName)
	if info, err := os.Lstat(ackPath); err == nil && !info.Mode().IsRegular() {
		if err := s.setAside(ackPath); err != nil {
			return err
		}
	}
	if err := s.openAcks(ackPath); err != nil {
		return err
	}
	mark := s.acks.saved

	entries, err := os.ReadDir(s.dir)
	if err != nil {
		return err
	}
	var firsts []ID
	for _, e := range entries {
		if first, ok := parseSegmentName(e.Name()); ok {
			firsts = append(firsts, first)
		}
	}
	slices.Sort(firsts)
	var after ID
	for i, first := range firsts {
		before := noLimit
		if i+1 < len(firsts) {
			before = firsts[i+1]
		}
		seg, sc, err := s.load(first, max(after, first-1), before, mark, i == len(firsts)-1)
		if err != nil {
			return err
		}
		if seg == nil {
			continue
		}
		after = seg.last
		s.segs = append(s.segs, seg)
		s.disk += seg.size
		seg.consumed, seg.released = sc.below, sc.below
		if s.cursor.seg == nil && sc.unacked > 0 {
			s.cursor = cursor{seg: seg, off: sc.unacked, prev: sc.passed}
		}
	}
	if err := s.dirf.Sync(); err != nil {
		return err
	}

	s.released = mark
	s.nextID = max(mark, after+1, 1)
	if n := len(s.segs); s.cursor.seg == nil && n > 0 {
		last := s.segs[n-1]
		s.cursor = cursor{seg: last, off: last.size, prev: last.last}
	} else if s.cursor.seg == nil {
		s.cursor.prev = s.nextID - 1
	}
	s.mu.Lock()
	s.trimLocked()
	s.mu.Unlock()
	return nil
}

func (s *Spool) openAcks(path string) error {
	f, err := openPrivate(path, os.O_RDWR|os.O_CREATE)
	if err != nil {
		return fmt.Errorf("cannot open the acknowledgement state: %w", err)
	}
	s.acks = readAckFile(f)
	// Both slots are written at once when the file is new (or was cut short), so that no
	// later save needs a block the file system may not have left.
	if info, err := f.Stat(); err == nil && info.Size() >= ackSlotStride+ackSlotSize {
		return nil
	}
	for range 2 {
		if err := s.acks.save(s.acks.saved); err != nil {
			return fmt.Errorf("cannot write the acknowledgement state: %w", err)
		}
	}
	if err := s.acks.sync(); err != nil {
		return fmt.Errorf("cannot write the acknowledgement state: %w", err)
	}
	return nil
}

// load reads one segment file. It returns no segment for a file set aside, or removed
// because it holds nothing.
func (s *Spool) load(first, after, before, mark ID, last bool) (*segment, scan, error) {
	path := filepath.Join(s.dir, segmentName(first))
	if info, err := os.Lstat(path); err != nil {
		return nil, scan{}, err
	} else if !info.Mode().IsRegular() {
		return nil, scan{}, s.setAside(path)
	}
	data, err := os.ReadFile(path)
	if err != nil {
		// Unreadable (a failing medium): out of the way, so that the queue goes on.
		return nil, scan{}, s.setAside(path)
	}
	switch {
	case int64(len(data)) < segmentHeader || bytes.Count(data[:segmentHeader], []byte{0}) == int(segmentHeader):
		// A header the crash left unwritten: the last segment was being created, and none
		// of its records had been acknowledged to their applications.
		if !last {
			return nil, scan{}, s.setAside(path)
		}
		if len(data) > 0 {
			s.counts.Torn++
		}
		return nil, scan{}, os.Remove(path)
	case string(data[:segmentHeader]) != segmentMagic:
		return nil, scan{}, s.setAside(path)
	}
	sc, err := scanSegment(data, segmentHeader, after, before, mark)
	if errors.Is(err, errOutOfOrder) {
		return nil, scan{}, s.setAside(path)
	}
	s.counts.Torn += int64(sc.damaged)
	if sc.records == 0 {
		if sc.damaged > 0 && !last {
			return nil, scan{}, s.setAside(path)
		}
		return nil, scan{}, os.Remove(path)
	}
	f, err := openPrivate(path, os.O_RDWR)
	if err != nil {
		return nil, scan{}, err
	}
	seg := &segment{first: first, path: path, f: f, size: int64(len(data)), holes: sc.holes,
		records: sc.records, last: sc.last, newest: sc.newest}
	if sc.tail {
		if last {
			// A torn tail: the records in it never reached their applications as stored.
			if err := f.Truncate(sc.end); err != nil {
				f.Close()
				return nil, scan{}, err
			}
			if err := fdatasync(f); err != nil {
				f.Close()
				return nil, scan{}, err
			}
			seg.size = sc.end
		} else {
			if seg.holes == nil {
				seg.holes = make(map[int64]int64)
			}
			seg.holes[sc.end] = seg.size
		}
	}
	return seg, sc, nil
}

// setAside renames a file that cannot be a segment out of the way, keeping its bytes.
func (s *Spool) setAside(path string) error {
	aside := path + ".corrupt-" + time.Now().UTC().Format("20060102T150405.000000000Z")
	if err := os.Rename(path, aside); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("cannot set %s aside: %w", path, err)
	}
	s.counts.SetAside++
	return nil
}

package spool

import (
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
)

// A segment file: this magic, then records. Its name is the first record's ID in 16 hex
// digits, so names sort in queue order.
const (
	segmentMagic  = "unispl1\n"
	segmentHeader = int64(len(segmentMagic))
	segmentSuffix = ".seg"
)

// segment is one segment file and what the spool knows of its records.
type segment struct {
	first ID
	path  string
	f     *os.File // read by Next, appended to by the writer while it is the last segment

	size int64 // bytes in the file, all of them durable
	// holes maps where a damaged stretch starts to where the next intact record starts, or
	// to size.
	holes map[int64]int64

	records  int // intact records
	consumed int // records the read cursor has passed
	released int // records acknowledged, dropped or expired
	last     ID
	newest   int64 // append time of the newest record, Unix ns
}

func segmentName(first ID) string {
	return fmt.Sprintf("%016x%s", uint64(first), segmentSuffix)
}

// parseSegmentName returns the first ID a segment file name stands for.
func parseSegmentName(name string) (ID, bool) {
	digits, ok := strings.CutSuffix(name, segmentSuffix)
	if !ok || len(digits) != 16 {
		return 0, false
	}
	v, err := strconv.ParseUint(digits, 16, 64)
	if err != nil || segmentName(ID(v)) != name {
		return 0, false
	}
	return ID(v), true
}

// errOutOfOrder: a segment holds intact records whose IDs do not follow the queue's, so it
// is not where this spool left it (copied in, renamed, or from another spool).
var errOutOfOrder = errors.New("records out of queue order")

// scan is what reading a segment's bytes found.
type scan struct {
	records int
	last    ID
	newest  int64
	end     int64 // where the intact records end
	holes   map[int64]int64
	// damaged counts stretches of bytes that are not intact records; tail says the last one
	// runs to the end of the file. lost holds the ID ranges they may have held; the last
	// range of a damaged tail ends at noLimit.
	damaged int
	tail    bool
	lost    []fate
	// below counts the records under the acknowledgement mark; unacked is where the first
	// record at or above it starts (0: none), and passed the ID of the record before it.
	below   int
	unacked int64
	passed  ID
}

// scanSegment reads a segment's bytes from offset from on. Record IDs must rise and lie in
// (after, before); an intact record outside that order is errOutOfOrder. acked is the
// acknowledgement mark.
func scanSegment(data []byte, from int64, after, before, acked ID) (scan, error) {
	sc := scan{end: from, passed: after}
	prev := after
	off := int(from)
	for off < len(data) {
		id, t, n, err := checkRecord(data[off:])
		if err == nil {
			if id <= prev || id >= before {
				return sc, fmt.Errorf("%w: ID %d at offset %d after ID %d", errOutOfOrder, id, off, prev)
			}
			switch {
			case id < acked:
				sc.below++
				sc.passed = id
			case sc.unacked == 0:
				sc.unacked = int64(off)
			}
			sc.records++
			sc.last, prev = id, id
			sc.newest = max(sc.newest, t)
			off += n
			sc.end = int64(off)
			continue
		}
		sc.damaged++
		next := resync(data[off:], prev, before)
		if next < 0 {
			sc.tail = true
			sc.lost = append(sc.lost, fate{first: prev + 1, last: noLimit})
			break
		}
		resumeID, _, _, _ := checkRecord(data[off+next:])
		sc.lost = append(sc.lost, fate{first: prev + 1, last: resumeID - 1})
		if sc.holes == nil {
			sc.holes = make(map[int64]int64)
		}
		sc.holes[int64(off)] = int64(off + next)
		off += next
	}
	return sc, nil
}

// createSegment makes a new segment file for records from first on. Its header goes to disk
// with the first records, in the same write.
func createSegment(dir string, first ID) (*segment, error) {
	path := filepath.Join(dir, segmentName(first))
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		return nil, err
	}
	return &segment{first: first, path: path, f: f, last: first - 1}, nil
}

// fdatasync flushes a file's data and the metadata needed to read it back (its size), not
// its times. A variable so that tests can make it fail.
var fdatasync = func(f *os.File) error {
	for {
		err := syscall.Fdatasync(int(f.Fd()))
		if err != syscall.EINTR {
			if err != nil {
				return &os.PathError{Op: "fdatasync", Path: f.Name(), Err: err}
			}
			return nil
		}
	}
}

// The acknowledgement state: the ID below which every record is acknowledged, dropped or
// expired. Two slots a page apart take turns, each with a generation and a CRC32C, so a
// write torn by a power cut leaves the other slot and its older, still true, state.
const (
	ackName       = "acked"
	ackMagic      = "uack"
	ackSlotSize   = 4 + 8 + 8 + 4
	ackSlotStride = 4096
)

type ackFile struct {
	f     *os.File
	gen   uint64
	saved ID
}

// readAckFile reads the acknowledgement state from f; no readable slot means 0 (no record
// acknowledged).
func readAckFile(f *os.File) *ackFile {
	a := &ackFile{f: f}
	for slot := range 2 {
		var b [ackSlotSize]byte
		if _, err := f.ReadAt(b[:], int64(slot)*ackSlotStride); err != nil {
			continue
		}
		if string(b[:4]) != ackMagic || crc32.Checksum(b[:ackSlotSize-4], castagnoli) != binary.LittleEndian.Uint32(b[ackSlotSize-4:]) {
			continue
		}
		if gen := binary.LittleEndian.Uint64(b[4:]); gen >= a.gen {
			a.gen, a.saved = gen, ID(binary.LittleEndian.Uint64(b[12:]))
		}
	}
	return a
}

// save writes w to the slot not holding the newest state. It reaches the page cache, which a
// killed process does not lose; sync makes it survive a power cut.
func (a *ackFile) save(w ID) error {
	var b [ackSlotSize]byte
	copy(b[:], ackMagic)
	binary.LittleEndian.PutUint64(b[4:], a.gen+1)
	binary.LittleEndian.PutUint64(b[12:], uint64(w))
	binary.LittleEndian.PutUint32(b[ackSlotSize-4:], crc32.Checksum(b[:ackSlotSize-4], castagnoli))
	if _, err := a.f.WriteAt(b[:], int64((a.gen+1)%2)*ackSlotStride); err != nil {
		return err
	}
	a.gen++
	a.saved = w
	return nil
}

func (a *ackFile) sync() error { return fdatasync(a.f) }

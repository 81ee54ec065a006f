package spool

import (
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"io"
	"math"
	"slices"
)

// A record on disk: a header of the body's length and the CRC32C of length and body, both
// little-endian uint32, then the body:
//
//	uint64 ID | int64 append time (Unix ns) | uvarint len, app | uvarint n, n × (uvarint len,
//	name, uvarint len, value) | payload (the rest)
//
// Properties are written sorted by name, so a message always encodes to the same bytes.
const (
	recordHeader = 8
	// minBody is an ID, a time, an empty app name and no properties.
	minBody = 8 + 8 + 1 + 1
	// MaxMessageBytes bounds a record's body: payload, property names and values, the app
	// name, and 20-odd bytes of framing. Twice the hub's largest telemetry message, so what
	// the hub takes always fits; a length field above it marks a record as corrupt.
	MaxMessageBytes = 512 << 10
)

var castagnoli = crc32.MakeTable(crc32.Castagnoli)

// errCorrupt marks bytes that are not a whole, intact record: cut short by a crash, damaged
// on the medium, or not written by this package.
var errCorrupt = errors.New("not an intact record")

// encodeRecord returns m's record with ID, time and CRC left for seal to fill in.
func encodeRecord(m Message) ([]byte, error) {
	names := make([]string, 0, len(m.Properties))
	size := recordHeader + minBody + len(m.App) + len(m.Payload) + 2*binary.MaxVarintLen64
	for k, v := range m.Properties {
		names = append(names, k)
		size += len(k) + len(v) + 2*binary.MaxVarintLen64
	}
	slices.Sort(names)
	b := make([]byte, recordHeader+16, size)
	b = binary.AppendUvarint(b, uint64(len(m.App)))
	b = append(b, m.App...)
	b = binary.AppendUvarint(b, uint64(len(names)))
	for _, k := range names {
		b = binary.AppendUvarint(b, uint64(len(k)))
		b = append(b, k...)
		b = binary.AppendUvarint(b, uint64(len(m.Properties[k])))
		b = append(b, m.Properties[k]...)
	}
	b = append(b, m.Payload...)
	body := len(b) - recordHeader
	if body > MaxMessageBytes {
		return nil, fmt.Errorf("%w: %d bytes encoded, the spool takes %d", ErrTooLarge, body, MaxMessageBytes)
	}
	binary.LittleEndian.PutUint32(b[0:], uint32(body))
	return b, nil
}

// seal stamps a record from encodeRecord with its ID and time and computes its CRC.
func seal(rec []byte, id ID, unixNano int64) {
	binary.LittleEndian.PutUint64(rec[recordHeader:], uint64(id))
	binary.LittleEndian.PutUint64(rec[recordHeader+8:], uint64(unixNano))
	binary.LittleEndian.PutUint32(rec[4:], checksum(rec))
}

func checksum(rec []byte) uint32 {
	crc := crc32.Update(0, castagnoli, rec[0:4])
	return crc32.Update(crc, castagnoli, rec[recordHeader:])
}

// decodeRecord reads the record at the start of b and returns it with its length on disk.
// The record's payload and strings share nothing with b.
func decodeRecord(b []byte) (Record, int, error) {
	var r Record
	n, err := parseRecord(b, &r)
	return r, n, err
}

// checkRecord validates the record at the start of b without building it, and returns its
// ID, time and length on disk.
func checkRecord(b []byte) (id ID, unixNano int64, n int, err error) {
	n, err = parseRecord(b, nil)
	if err != nil {
		return 0, 0, 0, err
	}
	return ID(binary.LittleEndian.Uint64(b[recordHeader:])), int64(binary.LittleEndian.Uint64(b[recordHeader+8:])), n, nil
}

// parseRecord checks the record at the start of b, filling r if it is not nil.
func parseRecord(b []byte, r *Record) (int, error) {
	if len(b) < recordHeader {
		return 0, fmt.Errorf("%w: %d bytes, shorter than a record header", errCorrupt, len(b))
	}
	size := binary.LittleEndian.Uint32(b[0:])
	if size < minBody || size > MaxMessageBytes {
		return 0, fmt.Errorf("%w: length %d out of range", errCorrupt, size)
	}
	n := recordHeader + int(size)
	if len(b) < n {
		return 0, fmt.Errorf("%w: %d of %d bytes", errCorrupt, len(b), n)
	}
	rec := b[:n]
	if got, want := checksum(rec), binary.LittleEndian.Uint32(rec[4:]); got != want {
		return 0, fmt.Errorf("%w: CRC32C %08x, the header says %08x", errCorrupt, got, want)
	}
	body := bodyReader{b: rec[recordHeader+16:]}
	app := body.bytes()
	count := body.uvarint()
	// Each property takes at least two bytes, which bounds a count read from damaged bytes
	// before anything is allocated for it.
	if body.err == nil && count > uint64(len(body.b))/2 {
		body.err = fmt.Errorf("%w: %d properties in %d bytes", errCorrupt, count, len(body.b))
	}
	var props map[string]string
	if r != nil && count > 0 && body.err == nil {
		props = make(map[string]string, count)
	}
	prev := ""
	for i := uint64(0); i < count && body.err == nil; i++ {
		k, v := body.bytes(), body.bytes()
		// The encoder writes names sorted and once each; anything else was not written by it.
		if i > 0 && string(k) <= prev {
			body.err = fmt.Errorf("%w: property names out of order", errCorrupt)
		}
		prev = string(k)
		if props != nil {
			props[string(k)] = string(v)
		}
	}
	if body.err != nil {
		return 0, body.err
	}
	if r != nil {
		var payload []byte
		if len(body.b) > 0 {
			payload = slices.Clone(body.b)
		}
		*r = Record{
			ID:   ID(binary.LittleEndian.Uint64(rec[recordHeader:])),
			Time: unixTime(int64(binary.LittleEndian.Uint64(rec[recordHeader+8:]))),
			Message: Message{
				App:        string(app),
				Properties: props,
				Payload:    payload,
			},
		}
	}
	return n, nil
}

// bodyReader takes length-prefixed fields off a record body; the first error sticks.
type bodyReader struct {
	b   []byte
	err error
}

func (r *bodyReader) uvarint() uint64 {
	if r.err != nil {
		return 0
	}
	v, n := binary.Uvarint(r.b)
	if n <= 0 {
		r.err = fmt.Errorf("%w: bad length field", errCorrupt)
		return 0
	}
	r.b = r.b[n:]
	return v
}

func (r *bodyReader) bytes() []byte {
	n := r.uvarint()
	if r.err != nil {
		return nil
	}
	if n > uint64(len(r.b)) {
		r.err = fmt.Errorf("%w: field of %d bytes in %d", errCorrupt, n, len(r.b))
		return nil
	}
	v := r.b[:n]
	r.b = r.b[n:]
	return v
}

// readRecord reads the record at off in r, which holds intact records up to end. One read
// covers the common small record; a larger one takes a second.
func readRecord(r io.ReaderAt, off, end int64) (Record, int64, error) {
	const guess = 4096
	if off >= end {
		return Record{}, 0, fmt.Errorf("%w: nothing at offset %d", errCorrupt, off)
	}
	buf := make([]byte, min(guess, end-off))
	if _, err := r.ReadAt(buf, off); err != nil {
		return Record{}, 0, err
	}
	if len(buf) >= recordHeader {
		if n := int64(recordHeader) + int64(binary.LittleEndian.Uint32(buf)); n > int64(len(buf)) && n <= end-off && n <= recordHeader+MaxMessageBytes {
			whole := make([]byte, n)
			copy(whole, buf)
			if _, err := r.ReadAt(whole[len(buf):], off+int64(len(buf))); err != nil {
				return Record{}, 0, err
			}
			buf = whole
		}
	}
	rec, n, err := decodeRecord(buf)
	if err != nil {
		return Record{}, 0, err
	}
	return rec, off + int64(n), nil
}

// resync finds the next intact record in data after damage at its start: the first offset
// holding a record whose ID lies in (after, before), and within maxIDGap of after. The ID
// test comes before the CRC, so that damaged bytes cost a CRC only where 8 of them happen to
// look like a nearby ID, and a false find needs that luck and the CRC's 32 bits. It returns
// -1 if none.
func resync(data []byte, after, before ID) int {
	before = min(before, after+maxIDGap)
	for off := 1; off+recordHeader+minBody <= len(data); off++ {
		id := ID(binary.LittleEndian.Uint64(data[off+recordHeader:]))
		if id <= after || id >= before {
			continue
		}
		if _, err := parseRecord(data[off:], nil); err == nil {
			return off
		}
	}
	return -1
}

// noLimit is the upper ID bound of resync in the last segment.
const noLimit = ID(math.MaxUint64)

// maxIDGap bounds how far IDs may jump between neighbouring records: only failed appends,
// whose IDs are never stored, make them jump at all.
const maxIDGap = 1 << 32

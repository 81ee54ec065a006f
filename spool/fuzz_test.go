package spool

import (
	"testing"
)

// FuzzDecodeRecord reads what a crash, a worn medium or a foreign file may put where a
// record should be: nothing panics; what decodes is a record that encodes back to itself;
// scanning the bytes as a segment accounts for every byte, as intact records or damage.
func FuzzDecodeRecord(f *testing.F) {
	for _, m := range []Message{
		{},
		{App: "sensor", Properties: map[string]string{"$.mid": "m-1", "$.ct": "application/json"}, Payload: []byte(`{"t":21.5}`)},
		{Properties: map[string]string{"": "", "k": ""}, Payload: []byte{0, 0xff}},
	} {
		rec, err := encodeRecord(m)
		if err != nil {
			f.Fatal(err)
		}
		seal(rec, 7, 1_700_000_000_000_000_000)
		f.Add(rec)
		f.Add(rec[:len(rec)-1])
		f.Add(append(rec, rec...))
	}
	f.Add([]byte{0xff, 0xff, 0xff, 0xff, 0, 0, 0, 0})
	f.Fuzz(func(t *testing.T, data []byte) {
		r, n, err := decodeRecord(data)
		if err == nil {
			if n < recordHeader+minBody || n > len(data) {
				t.Fatalf("length %d of %d bytes", n, len(data))
			}
			again, err := encodeRecord(r.Message)
			if err != nil {
				t.Fatalf("a decoded record does not encode: %v", err)
			}
			seal(again, r.ID, r.Time.UnixNano())
			back, m, err := decodeRecord(again)
			if err != nil || m != len(again) {
				t.Fatalf("an encoded record does not decode: %v", err)
			}
			if back.ID != r.ID || !back.Time.Equal(r.Time) || back.App != r.App || string(back.Payload) != string(r.Payload) || len(back.Properties) != len(r.Properties) {
				t.Fatalf("round trip changed the record: %+v != %+v", back, r)
			}
			for k, v := range r.Properties {
				if bv, ok := back.Properties[k]; !ok || bv != v {
					t.Fatalf("round trip changed property %q", k)
				}
			}
		}

		seg := append([]byte(segmentMagic), data...)
		sc, err := scanSegment(seg, segmentHeader, 0, noLimit, 0)
		if err != nil {
			return // intact records out of order: the file is set aside
		}
		if sc.end < segmentHeader || sc.end > int64(len(seg)) {
			t.Fatalf("intact records end at %d of %d", sc.end, len(seg))
		}
		for from, to := range sc.holes {
			if from < segmentHeader || to <= from || to > int64(len(seg)) {
				t.Fatalf("hole %d..%d in %d bytes", from, to, len(seg))
			}
		}
		if sc.tail != (sc.end < int64(len(seg))) {
			t.Fatalf("tail %v, records end at %d of %d", sc.tail, sc.end, len(seg))
		}
	})
}

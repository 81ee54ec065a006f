package attest

import (
	"bytes"
	"testing"

	"github.com/unicity-iot/unicity/internal/pki"
)

// FuzzParseDERChain reads what an NV index may hold: nothing panics, and an accepted chain
// re-encodes to the bytes it came from, padding aside.
func FuzzParseDERChain(f *testing.F) {
	ca, err := pki.NewRoot("fuzz root")
	if err != nil {
		f.Fatal(err)
	}
	leaf, err := ca.NewDevice("gw-fuzz")
	if err != nil {
		f.Fatal(err)
	}
	f.Add(append(leaf.Chain[0].Raw, ca.Root().Raw...))
	f.Add(append(leaf.Chain[0].Raw, 0xff, 0xff, 0, 0))
	f.Add([]byte{0x30, 0x03, 0x02, 0x01, 0x01})
	f.Add(append([]byte{0x30, 0x82, 0x00, 0x00}, bytes.Repeat([]byte{0xff}, 8)...))
	f.Add([]byte{0xff, 0xff})
	f.Fuzz(func(t *testing.T, b []byte) {
		chain, err := parseDERChain(b)
		if err != nil {
			return
		}
		var raw []byte
		for _, c := range chain {
			raw = append(raw, c.Raw...)
		}
		if !bytes.HasPrefix(b, raw) || len(bytes.Trim(b[len(raw):], "\x00\xff")) != 0 {
			t.Fatal("accepted bytes that are not the chain plus padding")
		}
	})
}

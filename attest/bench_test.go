package attest_test

import (
	"crypto"
	"crypto/rand"
	"crypto/sha256"
	"testing"
)

// BenchmarkSign measures signatures per second with the key loaded once (one TPM command
// each). Real TPMs are far slower than these emulators: measure on the target board.
func BenchmarkSign(b *testing.B) {
	for _, tp := range tpms {
		for _, alg := range algs {
			b.Run(tp.name+"/"+string(alg), func(b *testing.B) {
				tpm := tp.open(b)
				key, _ := newKey(b, tpm, alg)
				digest := sha256.Sum256([]byte("benchmark"))
				for b.Loop() {
					if _, err := key.Sign(rand.Reader, digest[:], crypto.SHA256); err != nil {
						b.Fatal(err)
					}
				}
				b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "sigs/s")
			})
		}
	}
}

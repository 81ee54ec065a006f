package attest_test

import (
	"crypto"
	"crypto/rand"
	"crypto/sha256"
	"crypto/tls"
	"fmt"
	"testing"

	"github.com/unicity-iot/unicity/attest"
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

// BenchmarkHandshake measures full mutual TLS handshakes on loopback with the TPM key (one
// signature each; session resumption would need none).
func BenchmarkHandshake(b *testing.B) {
	ca, roots := testCA(b)
	server, err := ca.IssueServer([]string{"127.0.0.1"})
	if err != nil {
		b.Fatal(err)
	}
	for _, tp := range tpms {
		for _, version := range []uint16{tls.VersionTLS12, tls.VersionTLS13} {
			b.Run(fmt.Sprintf("%s/%s", tp.name, tls.VersionName(version)), func(b *testing.B) {
				tpm := tp.open(b)
				key, _ := newKey(b, tpm, attest.ECDSAP256)
				id := enroll(b, key, ca, "gw-bench")
				ln, err := tls.Listen("tcp", "127.0.0.1:0", &tls.Config{
					Certificates: []tls.Certificate{server.TLSCertificate()},
					ClientAuth:   tls.RequireAndVerifyClientCert,
					ClientCAs:    roots,
				})
				if err != nil {
					b.Fatal(err)
				}
				defer ln.Close()
				go func() {
					for {
						conn, err := ln.Accept()
						if err != nil {
							return
						}
						go func() {
							conn.(*tls.Conn).Handshake()
							conn.Close()
						}()
					}
				}()
				conf := &tls.Config{
					Certificates: []tls.Certificate{id.TLSCertificate()},
					RootCAs:      roots,
					ServerName:   "127.0.0.1",
					MinVersion:   version,
					MaxVersion:   version,
				}
				for b.Loop() {
					conn, err := tls.Dial("tcp", ln.Addr().String(), conf)
					if err != nil {
						b.Fatal(err)
					}
					conn.Close()
				}
				b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "handshakes/s")
			})
		}
	}
}

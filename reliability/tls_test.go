package reliability_test

import (
	"context"
	"crypto/tls"
	"errors"
	"io"
	"net"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/unicity-iot/unicity/dps"
	"github.com/unicity-iot/unicity/hub"
	"github.com/unicity-iot/unicity/internal/dial"
	"github.com/unicity-iot/unicity/internal/pki"
)

// hostileServer accepts TLS with conf and, should a handshake ever succeed, reports it.
func hostileServer(t *testing.T, conf *tls.Config) (addr string, handshakes <-chan struct{}) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	ok := make(chan struct{}, 100)
	done := make(chan struct{})
	go func() {
		defer close(done)
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			tc := tls.Server(c, conf)
			tc.SetDeadline(time.Now().Add(5 * time.Second))
			if tc.Handshake() == nil {
				ok <- struct{}{}
				io.Copy(io.Discard, tc)
			}
			tc.Close()
		}
	}()
	t.Cleanup(func() { ln.Close(); <-done })
	return ln.Addr().String(), ok
}

// TestHostileServerTLS points the DPS and hub clients at servers that must not be trusted:
// each is refused on every attempt, nothing is sent to it, and the error says why.
func TestHostileServerTLS(t *testing.T) {
	trusted, err := pki.NewRoot("trusted root")
	require.NoError(t, err)
	other, err := pki.NewRoot("someone else's root")
	require.NoError(t, err)
	now := time.Now()
	cert := func(ca *pki.CA, names []string, opts ...pki.Option) []tls.Certificate {
		leaf, err := ca.IssueServer(names, opts...)
		require.NoError(t, err)
		return []tls.Certificate{leaf.TLSCertificate()}
	}
	good := []string{"localhost", "127.0.0.1"}
	tests := []struct {
		name string
		conf *tls.Config
		want string
	}{
		{"wrong CA", &tls.Config{Certificates: cert(other, good)}, "certificate signed by unknown authority"},
		{"hostname mismatch", &tls.Config{Certificates: cert(trusted, []string{"dps.example.net"})}, "certificate is valid for dps.example.net, not localhost"},
		{"expired", &tls.Config{Certificates: cert(trusted, good, pki.WithValidity(now.Add(-48*time.Hour), now.Add(-24*time.Hour)))}, "certificate has expired or is not yet valid"},
		{"not yet valid", &tls.Config{Certificates: cert(trusted, good, pki.WithValidity(now.Add(24*time.Hour), now.Add(48*time.Hour)))}, "certificate has expired or is not yet valid"},
		{"TLS 1.0 only", &tls.Config{Certificates: cert(trusted, good), MinVersion: tls.VersionTLS10, MaxVersion: tls.VersionTLS10}, "protocol version not supported"},
		{"TLS 1.1 only", &tls.Config{Certificates: cert(trusted, good), MinVersion: tls.VersionTLS11, MaxVersion: tls.VersionTLS11}, "protocol version not supported"},
		{"weak cipher suites only", &tls.Config{
			Certificates: cert(trusted, good, pki.WithKeyType(pki.RSA2048)),
			MaxVersion:   tls.VersionTLS12,
			CipherSuites: []uint16{tls.TLS_RSA_WITH_RC4_128_SHA, tls.TLS_ECDHE_RSA_WITH_RC4_128_SHA, tls.TLS_RSA_WITH_3DES_EDE_CBC_SHA, tls.TLS_RSA_WITH_AES_128_CBC_SHA},
		}, "handshake failure"},
	}
	device, err := trusted.NewDevice("gw-tls")
	require.NoError(t, err)
	devCert := device.TLSCertificate()
	const attempts = 3
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			addr, handshakes := hostileServer(t, tt.conf)
			_, port, _ := net.SplitHostPort(addr)
			host := "localhost:" + port

			t.Run("dps", func(t *testing.T) {
				ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
				defer cancel()
				var failures []error
				_, err := dps.Register(ctx, dps.Request{
					Endpoint: host, IDScope: "0ne00000001", Transport: dial.TransportMQTT,
					RootCAs: trusted.Pool(), Certificate: &devCert, Clock: scaledClock{},
					Progress: func(p dps.Progress) {
						if p.Err != nil {
							if failures = append(failures, p.Err); len(failures) == attempts {
								cancel()
							}
						}
					},
				})
				require.Error(t, err)
				assert.ErrorIs(t, err, dps.ErrUnreachable)
				assert.Contains(t, err.Error(), tt.want)
				require.Len(t, failures, attempts)
				for _, f := range failures {
					assert.Contains(t, f.Error(), tt.want, "every attempt is refused, with the reason")
				}
			})
			t.Run("hub", func(t *testing.T) {
				c, err := hub.New(hub.Config{
					Hub: host, DeviceID: "gw-tls",
					Dial:        dial.Config{Transport: dial.TransportMQTT, RootCAs: trusted.Pool(), Certificate: &devCert},
					Backoff:     func(int) time.Duration { return time.Millisecond },
					MaxFailures: attempts,
				})
				require.NoError(t, err)
				ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
				defer cancel()
				err = c.Run(ctx)
				require.ErrorIs(t, err, hub.ErrGaveUp)
				assert.Contains(t, err.Error(), tt.want)
				assert.False(t, errors.Is(err, context.DeadlineExceeded))
			})
			assert.Empty(t, handshakes, "no handshake with a hostile server ever completes")
		})
	}
}

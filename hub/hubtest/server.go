package hubtest

import (
	"crypto/x509"
	"net"
	"slices"
	"testing"
	"time"

	"github.com/unicity-iot/unicity/internal/certcodec"
	"github.com/unicity-iot/unicity/internal/pki"
)

// Server is a Hub listening on loopback for one test, with the CA that issued its server
// certificate.
type Server struct {
	*Hub
	// Addr is the MQTT over TLS address, "127.0.0.1:port".
	Addr string
	// WebSocketAddr serves MQTT over WebSocket on "/$iothub/websocket" and "/".
	WebSocketAddr string
	// CA issued the server certificate; clients trust its root (RootCAs).
	CA *pki.CA
}

// Option configures NewServer.
type Option func(*serverOptions)

type serverOptions struct {
	ca    *pki.CA
	names []string
	now   func() time.Time
}

// WithCA issues the server certificate from ca (e.g. the CA a DPS emulator also uses, so
// that one trust bundle covers both) instead of a fresh root.
func WithCA(ca *pki.CA) Option { return func(o *serverOptions) { o.ca = ca } }

// WithHostNames adds names the server certificate is valid for and devices may use in
// their username, besides localhost and 127.0.0.1 with the listening port.
func WithHostNames(names ...string) Option {
	return func(o *serverOptions) { o.names = append(o.names, names...) }
}

// WithClock sets the clock for certificate validity and SAS expiry.
func WithClock(now func() time.Time) Option { return func(o *serverOptions) { o.now = now } }

// NewServer starts a hub on 127.0.0.1 with random ports for MQTT/TLS and WebSocket and
// closes it when the test ends. Its name, what devices put in their username, is
// "localhost:<mqtt port>".
func NewServer(t testing.TB, opts ...Option) *Server {
	t.Helper()
	var o serverOptions
	for _, f := range opts {
		f(&o)
	}
	if o.ca == nil {
		ca, err := pki.NewRoot("hubtest root")
		if err != nil {
			t.Fatal(err)
		}
		o.ca = ca
	}
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	wl, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		l.Close()
		t.Fatal(err)
	}
	h, err := NewOnListeners(o.ca, l, wl, o.names, o.now)
	if err != nil {
		l.Close()
		wl.Close()
		t.Fatal(err)
	}
	t.Cleanup(func() { h.Close() })
	return &Server{Hub: h, Addr: l.Addr().String(), WebSocketAddr: wl.Addr().String(), CA: o.ca}
}

// NewOnListeners issues a server certificate from ca for localhost, 127.0.0.1 and extra,
// names the hub "localhost:<port of l>", or "localhost" on the standard port 8883 (the
// WebSocket address and extra names are aliases), and serves MQTT/TLS on l and, if ws is not
// nil, WebSocket on ws, until Close.
func NewOnListeners(ca *pki.CA, l, ws net.Listener, extra []string, now func() time.Time) (*Hub, error) {
	return NewNamed("localhost", ca, l, ws, extra, now)
}

// NewNamed is NewOnListeners for a hub that devices reach by host (a LAN name or address)
// rather than localhost: the hub is named "<host>:<port of l>", or host on port 8883, and the
// certificate is also valid for host.
func NewNamed(host string, ca *pki.CA, l, ws net.Listener, extra []string, now func() time.Time) (*Hub, error) {
	var names []string
	if _, port, _ := net.SplitHostPort(l.Addr().String()); port == "8883" {
		names = append(names, host)
	}
	names = append(names, hostPort(host, l), hostPort("localhost", l), hostPort("127.0.0.1", l))
	if ws != nil {
		names = append(names, hostPort(host, ws), hostPort("localhost", ws), hostPort("127.0.0.1", ws))
	}
	names = append(names, extra...)
	certNames := []string{"localhost", "127.0.0.1"}
	for _, n := range append([]string{host}, extra...) {
		if h, _, err := net.SplitHostPort(n); err == nil {
			n = h
		}
		if !slices.Contains(certNames, n) {
			certNames = append(certNames, n)
		}
	}
	leaf, err := ca.IssueServer(certNames)
	if err != nil {
		return nil, err
	}
	h, err := New(Config{Names: slices.Compact(names), Certificate: leaf.TLSCertificate(), Now: now})
	if err != nil {
		return nil, err
	}
	h.wg.Add(1)
	go func() { defer h.wg.Done(); h.Serve(l) }()
	if ws != nil {
		h.wg.Add(1)
		go func() { defer h.wg.Done(); h.ServeWebSocket(ws) }()
	}
	return h, nil
}

// RootCAs is a pool holding the server certificate's root, for device TLS configs.
func (s *Server) RootCAs() *x509.CertPool { return s.CA.Pool() }

// TrustBundle is RootCAs as PEM, for a client's trust_bundle file.
func (s *Server) TrustBundle() []byte { return certcodec.EncodeCertificates(s.CA.Root()) }

func hostPort(host string, l net.Listener) string {
	_, port, _ := net.SplitHostPort(l.Addr().String())
	return net.JoinHostPort(host, port)
}

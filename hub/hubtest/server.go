package hubtest

import (
	"crypto/x509"
	"errors"
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
	ca      *pki.CA
	names   []string
	now     func() time.Time
	journal Journal
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
	o := options(opts)
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
	h, err := NewNamed("localhost", l, wl, append(opts, WithCA(o.ca))...)
	if err != nil {
		l.Close()
		wl.Close()
		t.Fatal(err)
	}
	t.Cleanup(func() { h.Close() })
	return &Server{Hub: h, Addr: l.Addr().String(), WebSocketAddr: wl.Addr().String(), CA: o.ca}
}

func options(opts []Option) serverOptions {
	var o serverOptions
	for _, f := range opts {
		f(&o)
	}
	return o
}

// NewOnListeners issues a server certificate from ca for localhost, 127.0.0.1 and extra,
// names the hub "localhost:<port of l>", or "localhost" on the standard port 8883 (the
// WebSocket address and extra names are aliases), and serves MQTT/TLS on l and, if ws is not
// nil, WebSocket on ws, until Close.
func NewOnListeners(ca *pki.CA, l, ws net.Listener, extra []string, now func() time.Time) (*Hub, error) {
	return NewNamed("localhost", l, ws, WithCA(ca), WithHostNames(extra...), WithClock(now))
}

// NewNamed serves a hub that devices reach by host (a name or an address) on l, and on ws
// (if not nil) over WebSocket, until Close. The hub is named host when l is on port 8883, as
// Azure's are, "<host>:<port of l>" otherwise; host:port, the listening address and the
// WithHostNames names are aliases. The server certificate, from the WithCA CA (required), is
// valid for host, the listening address, localhost, 127.0.0.1 and the extra names' hosts.
func NewNamed(host string, l, ws net.Listener, opts ...Option) (*Hub, error) {
	o := options(opts)
	if o.ca == nil {
		return nil, errors.New("hubtest: NewNamed needs WithCA")
	}
	names := aliases(host, l, ws, o.names)
	certNames := []string{"localhost", "127.0.0.1"}
	for _, n := range names {
		if h, _, err := net.SplitHostPort(n); err == nil {
			n = h
		}
		if !slices.Contains(certNames, n) {
			certNames = append(certNames, n)
		}
	}
	leaf, err := o.ca.IssueServer(certNames)
	if err != nil {
		return nil, err
	}
	h, err := New(Config{Names: names, Certificate: leaf.TLSCertificate(), Now: o.now, Journal: o.journal})
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

// aliases are the names a hub served on l and ws answers to, its name first.
func aliases(host string, l, ws net.Listener, extra []string) []string {
	var names []string
	if _, port, _ := net.SplitHostPort(l.Addr().String()); port == "8883" {
		names = append(names, host)
	}
	for _, ln := range []net.Listener{l, ws} {
		if ln == nil {
			continue
		}
		ip, port, _ := net.SplitHostPort(ln.Addr().String())
		names = append(names, net.JoinHostPort(host, port), net.JoinHostPort(ip, port))
		if a := net.ParseIP(ip); a.IsUnspecified() || a.Equal(net.IPv4(127, 0, 0, 1)) {
			names = append(names, net.JoinHostPort("localhost", port), net.JoinHostPort("127.0.0.1", port))
		}
	}
	var out []string
	for _, n := range append(names, extra...) {
		if !slices.Contains(out, n) {
			out = append(out, n)
		}
	}
	return out
}

// RootCAs is a pool holding the server certificate's root, for device TLS configs.
func (s *Server) RootCAs() *x509.CertPool { return s.CA.Pool() }

// TrustBundle is RootCAs as PEM, for a client's trust_bundle file.
func (s *Server) TrustBundle() []byte { return certcodec.EncodeCertificates(s.CA.Root()) }

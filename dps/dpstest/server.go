// Package dpstest is an in-process Azure Device Provisioning Service for tests and for
// unicity-emulator, in the style of net/http/httptest. It serves the device-facing API over
// MQTT (TLS and WebSocket) as pinned by shared/protocol.md, and its REST form over HTTPS on
// the same ports (https.go): X.509 (CA and thumbprint) and symmetric-key enrollments,
// register and poll with retry-after, reprovisioning, certificate issuance from a CSR, the
// service's throttling limits and scripted faults. The service-side API (enrollments,
// registrations, the history of register requests, statistics) is Go methods, not HTTP; a
// Journal can keep registrations and history across restarts. It is not a broker: every
// reply goes to the connection that asked.
package dpstest

import (
	"context"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/unicity-iot/unicity/internal/certcodec"
	"github.com/unicity-iot/unicity/internal/mqttsrv"
	"github.com/unicity-iot/unicity/internal/pki"
)

// GlobalHost is the DPS global device endpoint; the server certificate is valid for it so
// that clients can keep their production host name and TLS server name.
const GlobalHost = "global.azure-devices-provisioning.net"

// Azure's documented service limits (DOC-DPS-LIMITS) and the retry-after it announces while
// assigning (protocol.md §7.2), the defaults of DefaultConfig.
const (
	DefaultRetryAfter     = 3 * time.Second
	DefaultMaxMessageSize = 96 << 10
	DefaultPollLimit      = 5
	PollWindow            = 10 * time.Second
	DefaultHub            = "hub.azure-devices.net"
)

// MinRetryAfter is the least retry-after that a client obeying it can follow without
// exceeding a poll limit of pollLimit per PollWindow (2 s for Azure's 5), whole seconds; 0
// when there is no limit.
func MinRetryAfter(pollLimit int) time.Duration {
	if pollLimit <= 0 {
		return 0
	}
	return (PollWindow/time.Duration(pollLimit) + time.Second - 1).Truncate(time.Second)
}

// UnknownDevice says how a device without a matching enrollment is refused.
type UnknownDevice int

const (
	// RefuseConnack answers CONNECT with return code 5 (not authorized).
	RefuseConnack UnknownDevice = iota
	// Refuse401 accepts the connection and answers each request with 401 and errorCode 401002.
	Refuse401
)

// Config is what a Server serves. Start from DefaultConfig: its zero durations and limits
// mean "none" (retry-after 0, no delay, no limit), not "default".
type Config struct {
	// IDScope selects this instance; empty picks a random "0ne…" scope.
	IDScope string
	// Addr is the MQTT/TLS listen address, WebSocketAddr the MQTT-over-WebSocket (HTTPS) one;
	// empty means "127.0.0.1:0". WebSocketAddr "-" serves no WebSocket port. Both serve MQTT
	// over WebSocket and the REST API over HTTPS; Addr serves MQTT over TLS as well.
	Addr, WebSocketAddr string
	// ServerCA issues the server certificate and is what clients trust; nil makes a fresh
	// root. ServerNames are added to localhost, 127.0.0.1 and GlobalHost.
	ServerCA    *pki.CA
	ServerNames []string
	// FactoryCA issues device certificates; nil makes one under ServerCA. Unless
	// NoFactoryEnrollment, it is enrolled as group enrollment "factory".
	FactoryCA           *pki.CA
	NoFactoryEnrollment bool
	// IssuingCA signs the CSRs of enrollments with a credential policy (sent with
	// api-version 2025-07-01-preview or later); nil makes one under ServerCA.
	IssuingCA *pki.CA
	// Hubs are the IoT hubs linked to this instance; enrollments without hubs of their own
	// allocate among them.
	Hubs []string
	// RetryAfter is announced on 202 responses (whole seconds, rounded up); AssignDelay is how
	// long after a register the operation completes.
	RetryAfter  time.Duration
	AssignDelay time.Duration
	// UnknownDevice selects how unenrolled devices and bad credentials are refused.
	UnknownDevice UnknownDevice
	// PollLimit is the most polls one registration ID may send per PollWindow before 429
	// (0: unlimited); RegistrationsPerMinute bounds register requests for the whole instance
	// (0: unlimited), and tells each device it refuses a slot of its own to come back at;
	// MaxMessageSize closes a connection that publishes a larger payload
	// (0: unlimited).
	PollLimit              int
	RegistrationsPerMinute int
	MaxMessageSize         int
	// MaxTLSVersion caps the TLS version: DPS speaks TLS 1.2 only (DOC-DPS-TLS), which
	// matters to RSA keys in TPMs that cannot sign RSA-PSS as TLS 1.3 needs. 0 allows 1.3.
	MaxTLSVersion uint16
	// Faults are armed at start; more can be added with AddFault.
	Faults []Fault
	// Registrar hears of every assignment (nil: nobody).
	Registrar Registrar
	// Journal keeps registrations and register requests across restarts (nil: nothing is
	// kept); Restore puts them back.
	Journal Journal
	// Now is the clock for validity checks, SAS expiry, assignment delay and limits.
	Now func() time.Time
	// Logger traces connections and requests when set.
	Logger *slog.Logger
}

// DefaultConfig is the behaviour of Azure DPS: TLS 1.2, retry-after 3 s, 5 polls per 10 s,
// 96 KB messages, unknown devices refused at CONNECT, one linked hub.
func DefaultConfig() Config {
	return Config{
		MaxTLSVersion:  tls.VersionTLS12,
		Hubs:           []string{DefaultHub},
		RetryAfter:     DefaultRetryAfter,
		PollLimit:      DefaultPollLimit,
		MaxMessageSize: DefaultMaxMessageSize,
	}
}

// Stats counts what the server has seen since it started.
type Stats struct {
	Connections   int64 // MQTT CONNECTs accepted (HTTPS has none: its requests count below)
	Refused       int64 // connections or requests refused for authentication
	Registrations int64 // register requests, throttled ones included
	Polls         int64 // operation status requests, throttled ones included
	Assignments   int64 // operations that ended assigned
	Throttled     int64 // 429 responses
}

type stats struct {
	connections, refused, registrations, polls, assignments, throttled atomic.Int64
}

// Server is a running DPS emulator. Its methods are safe for concurrent use.
type Server struct {
	cfg       Config
	serverCA  *pki.CA
	factoryCA *pki.CA
	issuingCA *pki.CA
	tlsConfig *tls.Config
	mqtt      *mqttsrv.Server
	https     *http.Server
	ln, wsLn  net.Listener
	opPrefix  string
	log       *slog.Logger
	stats     stats

	mu          sync.Mutex
	individuals map[string]*Individual // by lower-case registration ID
	groups      []*Group
	tpmKeys     map[string][]byte      // lower-case registration ID → identity key of its latest TPM challenge
	records     map[string]*record     // by lower-case registration ID
	ops         map[string]*operation  // by operation ID
	latestOp    map[string]string      // lower-case registration ID → operation ID
	polls       map[string][]time.Time // lower-case registration ID → recent polls
	quota       []time.Time            // register requests in the last minute and slots kept, in order
	reserved    map[string]time.Time   // lower-case registration ID → slot kept after a 429
	attempts    []*Attempt             // register requests, by Seq
	seq         uint64                 // of the latest attempt
	faults      []*armedFault
	profiles    map[string]string // hub → connectionProfile, when not classic

	closing   chan struct{}
	closeOnce sync.Once
	wg        sync.WaitGroup // delayed replies and serving goroutines
}

// New prepares a server from cfg, making whatever CAs it lacks. Call Start to listen.
func New(cfg Config) (*Server, error) {
	s := &Server{
		cfg:         cfg,
		individuals: make(map[string]*Individual),
		tpmKeys:     make(map[string][]byte),
		records:     make(map[string]*record),
		ops:         make(map[string]*operation),
		latestOp:    make(map[string]string),
		polls:       make(map[string][]time.Time),
		reserved:    make(map[string]time.Time),
		closing:     make(chan struct{}),
		log:         cfg.Logger,
	}
	if s.cfg.Now == nil {
		s.cfg.Now = time.Now
	}
	if s.log == nil {
		s.log = slog.New(slog.DiscardHandler)
	}
	if s.cfg.IDScope == "" {
		s.cfg.IDScope = "0ne" + strings.ToUpper(randomHex(4))
	}
	s.opPrefix = "4." + randomHex(8) + "."
	var err error
	if s.serverCA = cfg.ServerCA; s.serverCA == nil {
		if s.serverCA, err = pki.NewRoot("unicity emulator root"); err != nil {
			return nil, err
		}
	}
	// Every CA chains to the server's root, so one trust bundle covers the whole emulator.
	if s.factoryCA, err = defaultCA(cfg.FactoryCA, s.serverCA, "unicity emulator factory CA"); err != nil {
		return nil, err
	}
	if s.issuingCA, err = defaultCA(cfg.IssuingCA, s.serverCA, "unicity emulator issuing CA"); err != nil {
		return nil, err
	}
	names := append([]string{"localhost", "127.0.0.1", GlobalHost}, cfg.ServerNames...)
	leaf, err := s.serverCA.IssueServer(names)
	if err != nil {
		return nil, err
	}
	s.tlsConfig = &tls.Config{
		Certificates: []tls.Certificate{leaf.TLSCertificate()},
		// The handshake proves possession of the leaf key; the chain is checked against the
		// enrollments in Connect, so that a stranger gets CONNACK 5 or 401 as Azure answers.
		ClientAuth: tls.RequestClientCert,
		MinVersion: tls.VersionTLS12,
		MaxVersion: cfg.MaxTLSVersion,
		// The strong TLS 1.2 suites Azure enforces (protocol.md §6) that crypto/tls implements.
		CipherSuites: []uint16{
			tls.TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256, tls.TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
			tls.TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256, tls.TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384,
		},
	}
	if !cfg.NoFactoryEnrollment {
		if err := s.AddGroup(Group{ID: "factory", CA: s.factoryCA.Certificate}); err != nil {
			return nil, err
		}
	}
	for _, f := range cfg.Faults {
		s.AddFault(f)
	}
	maxPacket := 0
	if cfg.MaxMessageSize > 0 {
		// Room for the topic, so that an oversized payload reaches Publish and is refused
		// there with a reason rather than by the framing layer.
		maxPacket = cfg.MaxMessageSize + 1<<16 + 16
	}
	s.mqtt = &mqttsrv.Server{Handler: (*handler)(s), TLSConfig: s.tlsConfig, MaxPacketSize: maxPacket}
	s.mqtt.HTTP = s.httpHandler()
	return s, nil
}

func defaultCA(given, parent *pki.CA, cn string) (*pki.CA, error) {
	if given != nil {
		return given, nil
	}
	return parent.NewIntermediate(cn)
}

// Start listens on the configured addresses and serves in the background.
func (s *Server) Start() error {
	addr := s.cfg.Addr
	if addr == "" {
		addr = "127.0.0.1:0"
	}
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return fmt.Errorf("cannot listen for MQTT: %w", err)
	}
	s.ln = ln
	if s.cfg.WebSocketAddr != "-" {
		wsAddr := s.cfg.WebSocketAddr
		if wsAddr == "" {
			wsAddr = "127.0.0.1:0"
		}
		wsLn, err := net.Listen("tcp", wsAddr)
		if err != nil {
			ln.Close()
			return fmt.Errorf("cannot listen for WebSocket: %w", err)
		}
		s.wsLn = wsLn
		s.https = &http.Server{
			Handler: s.mqtt.HTTP,
			// The listener does TLS; setting TLSConfig (without "h2") keeps net/http from
			// adding HTTP/2 to it, which WebSocket upgrades cannot use.
			TLSConfig:         s.tlsConfig,
			ReadHeaderTimeout: mqttsrv.DefaultConnectTimeout,
			ErrorLog:          slog.NewLogLogger(s.log.Handler(), slog.LevelDebug),
		}
		s.wg.Add(1)
		go func() {
			defer s.wg.Done()
			s.https.Serve(tls.NewListener(wsLn, s.tlsConfig))
		}()
	}
	s.wg.Add(1)
	go func() {
		defer s.wg.Done()
		s.mqtt.Serve(ln)
	}()
	return nil
}

// Close stops listening, ends every connection and waits for background work.
func (s *Server) Close() error {
	s.closeOnce.Do(func() {
		close(s.closing)
		if s.https != nil {
			// Hijacked WebSocket connections are closed by the MQTT server below.
			s.https.Shutdown(context.Background())
		}
		s.mqtt.Close()
		s.wg.Wait()
	})
	return nil
}

// NewServer starts a server for a test, configured by DefaultConfig and then opts, and closes
// it when the test ends.
func NewServer(t testing.TB, opts ...func(*Config)) *Server {
	t.Helper()
	cfg := DefaultConfig()
	for _, o := range opts {
		o(&cfg)
	}
	s, err := New(cfg)
	if err != nil {
		t.Fatalf("dpstest: %v", err)
	}
	if err := s.Start(); err != nil {
		t.Fatalf("dpstest: %v", err)
	}
	t.Cleanup(func() { s.Close() })
	return s
}

// Addr is the MQTT/TLS address, host:port.
func (s *Server) Addr() string { return s.ln.Addr().String() }

// WebSocketAddr is the MQTT-over-WebSocket address, host:port ("" when not served).
func (s *Server) WebSocketAddr() string {
	if s.wsLn == nil {
		return ""
	}
	return s.wsLn.Addr().String()
}

// WebSocketURL is the URL a WebSocket client dials.
func (s *Server) WebSocketURL() string { return "wss://" + s.WebSocketAddr() + "/$iothub/websocket" }

// IDScope is the scope devices put in their username.
func (s *Server) IDScope() string { return s.cfg.IDScope }

// RootCAs holds the root that clients must trust to verify the server.
func (s *Server) RootCAs() *x509.CertPool { return s.serverCA.Pool() }

// TrustBundle is RootCAs as PEM, for a client's trust_bundle file.
func (s *Server) TrustBundle() []byte { return certcodec.EncodeCertificates(s.serverCA.Root()) }

// FactoryCA issues device certificates that the "factory" group enrollment accepts.
func (s *Server) FactoryCA() *pki.CA { return s.factoryCA }

// IssuingCA signs the CSRs that devices send with their registration.
func (s *Server) IssuingCA() *pki.CA { return s.issuingCA }

// Stats returns the counters.
func (s *Server) Stats() Stats {
	return Stats{
		Connections:   s.stats.connections.Load(),
		Refused:       s.stats.refused.Load(),
		Registrations: s.stats.registrations.Load(),
		Polls:         s.stats.polls.Load(),
		Assignments:   s.stats.assignments.Load(),
		Throttled:     s.stats.throttled.Load(),
	}
}

// ErrNotFound is returned for an enrollment or registration that does not exist.
var ErrNotFound = errors.New("not found")

func randomHex(n int) string {
	b := make([]byte, n)
	rand.Read(b)
	return hex.EncodeToString(b)
}

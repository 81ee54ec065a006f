// Package hubtest emulates an Azure IoT Hub's device-facing MQTT service in process, for
// tests (NewServer, in the style of net/http/httptest) and for the unicity-emulator command
// (New). It keeps a device registry with X.509 and SAS authentication, records telemetry,
// queues cloud-to-device messages, serves device twins, invokes direct methods and renews
// operational certificates (issueCertificate), with the wire behaviour pinned by
// shared/protocol.md §5 and shared/certificates.md §3. A Fleet of hubs takes the assignments
// of a dps/dpstest server; a Journal can keep a hub's state across restarts; tests can inject
// transient faults. It is not a broker: nothing a device publishes reaches another device.
package hubtest

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"net"
	"net/http"
	"strings"
	"sync"
	"time"

	"github.com/unicity-iot/unicity/internal/mqttsrv"
)

// Errors returned by the controls; callers branch on them with errors.Is.
var (
	ErrDeviceNotFound  = errors.New("device not found")
	ErrDeviceNotOnline = errors.New("device not online") // Azure 404103
	ErrQueueFull       = errors.New("cloud-to-device queue full")
	ErrTimeout         = errors.New("device did not answer in time") // Azure 504101
	ErrBadTwinPatch    = errors.New("invalid twin patch")
)

// Limits from DOC-HUB-QUOTAS (protocol.md §5.3, §5.4, §5.6).
const (
	MaxTelemetrySize = 256 << 10
	MaxC2DSize       = 64 << 10
	MaxC2DPending    = 50
	MaxMethodPayload = 128 << 10
)

// Config is what New needs.
type Config struct {
	// Names are the host names devices use for this hub in the CONNECT username and in SAS
	// resources, e.g. "localhost:8884". The first is the hub's name, which DPS returns as
	// assignedHub. At least one is required.
	Names []string
	// Certificate is the server certificate; it must be valid for the host part of Names.
	Certificate tls.Certificate
	// Now is the clock used for certificate validity and SAS expiry (default time.Now).
	Now func() time.Time
	// Journal keeps the registry, twins, queues and telemetry across restarts (nil: nothing
	// is kept); Restore puts them back.
	Journal Journal
}

// Hub is one emulated IoT Hub. Its methods are safe for concurrent use.
type Hub struct {
	names   []string
	now     func() time.Time
	journal Journal
	tls     *tls.Config
	mqtt    *mqttsrv.Server

	mu        sync.Mutex
	devices   map[string]*device
	telemetry []Telemetry
	refusals  []Refusal
	stats     Stats
	// injected faults (faults.go)
	failConnects, failTwin int
	failConnectCode        byte
	failTwinStatus         int
	creds                  credentials   // certificate renewal (credentials.go)
	changed                chan struct{} // closed and replaced whenever observable state changes
	https                  []*http.Server
	closed                 bool
	wg                     sync.WaitGroup // goroutines waiting for acks and grace periods
}

// Stats counts what the hub has seen since it started, for tests that check retry behaviour
// and for fleet statistics.
type Stats struct {
	Connections  int // accepted CONNECTs
	Refused      int // CONNECTs answered with a non-zero CONNACK
	Kicked       int // connections closed by the hub: a newer connection, disable, delete, move
	Violations   int // connections closed for protocol misuse (QoS 2, unknown topic, oversize)
	Telemetry    int // device-to-cloud messages received
	C2DSent      int // cloud-to-device messages queued
	C2DCompleted int // cloud-to-device messages the device acknowledged
	Methods      int // direct method invocations sent to a device
}

// New returns a hub that serves nothing until Serve or ServeWebSocket is called.
func New(cfg Config) (*Hub, error) {
	if len(cfg.Names) == 0 {
		return nil, errors.New("hubtest: Config.Names is empty")
	}
	if len(cfg.Certificate.Certificate) == 0 {
		return nil, errors.New("hubtest: Config.Certificate is empty")
	}
	h := &Hub{
		names:   cfg.Names,
		now:     cfg.Now,
		journal: cfg.Journal,
		devices: make(map[string]*device),
		changed: make(chan struct{}),
	}
	if h.now == nil {
		h.now = time.Now
	}
	h.tls = &tls.Config{
		Certificates: []tls.Certificate{cfg.Certificate},
		MinVersion:   tls.VersionTLS12,
		// The hub asks for a certificate but verifies it itself on CONNECT, against the
		// device's registry entry, so that a wrong certificate becomes CONNACK 5 as in Azure.
		ClientAuth: tls.RequestClientCert,
	}
	h.mqtt = &mqttsrv.Server{Handler: handler{h}, TLSConfig: h.tls, MaxPacketSize: MaxTelemetrySize + 64<<10}
	return h, nil
}

// Name is the hub's host name as DPS assigns it.
func (h *Hub) Name() string { return h.names[0] }

// Serve accepts MQTT over TLS connections on l until Close. It always returns an error.
func (h *Hub) Serve(l net.Listener) error { return h.mqtt.Serve(l) }

// ServeWebSocket accepts MQTT over WebSocket over TLS on l until Close.
func (h *Hub) ServeWebSocket(l net.Listener) error {
	srv := &http.Server{
		Handler:   h.mqtt.WebSocket(),
		TLSConfig: h.tls,
		// An empty map keeps HTTP/2 off: WebSocket upgrades need HTTP/1.1.
		TLSNextProto:      map[string]func(*http.Server, *tls.Conn, http.Handler){},
		ReadHeaderTimeout: mqttsrv.DefaultConnectTimeout,
	}
	h.mu.Lock()
	if h.closed {
		h.mu.Unlock()
		l.Close()
		return mqttsrv.ErrClosed
	}
	h.https = append(h.https, srv)
	h.mu.Unlock()
	return srv.ServeTLS(l, "", "")
}

// Close stops serving, ends every connection and waits for the hub's goroutines.
func (h *Hub) Close() error {
	h.mu.Lock()
	h.closed = true
	https := h.https
	h.mu.Unlock()
	for _, s := range https {
		s.Close()
	}
	h.mqtt.Close()
	h.wg.Wait()
	return nil
}

// Stats returns the connection counters.
func (h *Hub) Stats() Stats {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.stats
}

// Await returns when cond reports true, re-checking it after every change of the hub's
// state (connections, telemetry, twins, queues), or when ctx ends. cond may call the hub's
// methods.
func (h *Hub) Await(ctx context.Context, cond func() bool) error {
	for {
		h.mu.Lock()
		ch := h.changed
		h.mu.Unlock()
		if cond() {
			return nil
		}
		select {
		case <-ch:
		case <-ctx.Done():
			return fmt.Errorf("hubtest: condition not met: %w", ctx.Err())
		}
	}
}

// broadcast wakes Await; h.mu must be held.
func (h *Hub) broadcast() {
	close(h.changed)
	h.changed = make(chan struct{})
}

// isName reports whether host is one of the names devices may use for this hub.
func (h *Hub) isName(host string) bool {
	for _, n := range h.names {
		if strings.EqualFold(n, host) {
			return true
		}
	}
	return false
}

// after runs f once d has passed, unless c ends first; Close waits for it.
func (h *Hub) after(d time.Duration, c *mqttsrv.Conn, f func()) {
	h.wg.Add(1)
	go func() {
		defer h.wg.Done()
		select {
		case <-time.After(d):
			f()
		case <-c.Done():
		}
	}()
}

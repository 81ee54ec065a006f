package reliability_test

import (
	"context"
	"crypto/x509"
	"fmt"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/unicity-iot/unicity/dps"
	"github.com/unicity-iot/unicity/dps/dpstest"
	"github.com/unicity-iot/unicity/hub"
	"github.com/unicity-iot/unicity/hub/hubtest"
	"github.com/unicity-iot/unicity/internal/dial"
	"github.com/unicity-iot/unicity/internal/faultnet"
	"github.com/unicity-iot/unicity/internal/pki"
)

// Records of a TLS 1.2 handshake with a client certificate: the client's ClientHello,
// Certificate, ClientKeyExchange, CertificateVerify, ChangeCipherSpec and Finished; the
// server's ServerHello, Certificate, ServerKeyExchange, CertificateRequest, ServerHelloDone,
// ChangeCipherSpec and Finished. Every later record carries one MQTT packet.
const (
	handshakeUp   = 6
	handshakeDown = 7
)

// inHandshake reports whether a stall after n records in dir leaves the TLS handshake
// unfinished (a stall silences both directions, so the server's last flight is lost too).
func inHandshake(dir faultnet.Direction, n int) bool {
	if dir == faultnet.Up {
		return n <= handshakeUp
	}
	return n < handshakeDown
}

// sweep is every fault the suite injects into one connection: each action after each record
// count in each direction, until a count exceeds the records the exchange has. A stall
// inside the TLS handshake costs a whole dial timeout, so the short form stalls only after.
type sweepCase struct {
	fault faultnet.Fault
	name  string
}

func sweepFaults(maxRecords int, stallHandshake bool) []sweepCase {
	var out []sweepCase
	for _, a := range []faultnet.Action{faultnet.Drop, faultnet.Reset, faultnet.Stall} {
		for _, d := range []faultnet.Direction{faultnet.Up, faultnet.Down} {
			for n := 0; n <= maxRecords; n++ {
				if n == 0 && d == faultnet.Down {
					continue // at accept, before any byte: the same fault as up's
				}
				if a == faultnet.Stall && (n == 0 || inHandshake(d, n)) && !stallHandshake {
					continue
				}
				out = append(out, sweepCase{
					fault: faultnet.Fault{Direction: d, AfterRecords: n, Action: a},
					name:  fmt.Sprintf("%s %s after %d records", a, d, n),
				})
			}
		}
	}
	return out
}

// TestDPSNetworkFaults registers through the fault proxy with one fault on the first
// connection, for every action at every record of the exchange (TLS handshake, CONNECT,
// SUBSCRIBE, register, each poll): every registration ends assigned, within a bounded number
// of connections, and the process keeps no goroutine or descriptor from the failed ones.
func TestDPSNetworkFaults(t *testing.T) {
	s := dpstest.NewServer(t, func(c *dpstest.Config) {
		c.PollLimit = 0
		c.AssignDelay = 100 * time.Millisecond // two or three polls at the scaled retry-after
	})
	leaf, err := s.FactoryCA().NewDevice("gw-netfault")
	require.NoError(t, err)
	cert := leaf.TLSCertificate()
	p := proxyTo(t, s.Addr())
	req := dps.Request{
		Endpoint:     p.Addr(),
		IDScope:      s.IDScope(),
		Transport:    dial.TransportMQTT,
		RootCAs:      s.RootCAs(),
		Certificate:  &cert,
		Clock:        scaledClock{},
		ReplyTimeout: 500 * time.Millisecond,
	}
	register := func(t *testing.T) {
		ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
		defer cancel()
		a, err := dps.Register(ctx, req)
		require.NoError(t, err)
		assert.Equal(t, dpstest.DefaultHub, a.AssignedHub)
	}
	register(t) // warm up: TLS and paho's first-use allocations are not leaks
	base := measure()

	survived, missed := 0, 0
	for _, tc := range sweepFaults(20, long()) {
		before, accepted := len(p.Fired()), p.Accepted()
		p.Inject(tc.fault)
		t.Run(tc.name, register)
		fired := len(p.Fired()) > before
		if fired {
			survived++
			assert.LessOrEqual(t, p.Accepted()-accepted, 6, "%s: bounded reconnections", tc.name)
		} else {
			missed++ // the exchange has fewer records: later counts of this kind are moot
		}
	}
	t.Logf("DPS: %d faults survived, %d record counts beyond the exchange", survived, missed)
	assert.Greater(t, survived, 30)
	checkNoGrowth(t, base, 4, "after the DPS fault sweep")
}

// TestHubNetworkFaults connects a hub client through the fault proxy with one fault on the
// first connection at every record of the session (TLS handshake, CONNECT, SUBSCRIBE, twin
// GET, telemetry): the client always reconnects, the twin answers and the telemetry arrives,
// and nothing leaks. A stall costs the dial timeout, or the time the hub takes to give up
// on a silent client (1.5 keep-alives), so the short form stalls only the first records.
func TestHubNetworkFaults(t *testing.T) {
	ca, err := pki.NewRoot("device root")
	require.NoError(t, err)
	leaf, err := ca.NewDevice("gw-hubfault")
	require.NoError(t, err)
	cert := leaf.TLSCertificate()

	// The device dials the proxy by a name the hub answers to and its certificate covers.
	p := proxyTo(t, "")
	name := "localhost:" + p.Port()
	srv := hubtest.NewServer(t, hubtest.WithHostNames(name))
	p.SetTarget(srv.Addr)
	require.NoError(t, srv.Register(hubtest.Device{ID: "gw-hubfault", CAs: []*x509.Certificate{ca.Root()}}))

	session := func(t *testing.T, n int) {
		c, err := hub.New(hub.Config{
			Hub:            name,
			DeviceID:       "gw-hubfault",
			Dial:           dial.Config{Transport: dial.TransportMQTT, RootCAs: srv.RootCAs(), Certificate: &cert, Timeout: 2 * time.Second},
			Backoff:        func(int) time.Duration { return 10 * time.Millisecond },
			KeepAlive:      time.Second,
			RequestTimeout: 3 * time.Second,
			WriteTimeout:   2 * time.Second,
			OnDesired:      func(hub.Desired) {},
		})
		require.NoError(t, err)
		ctx, cancel := context.WithTimeout(context.Background(), 120*time.Second)
		defer cancel()
		done := make(chan error, 1)
		go func() { done <- c.Run(ctx) }()
		defer func() {
			cancel()
			assert.ErrorIs(t, <-done, context.Canceled)
		}()
		require.NoError(t, c.AwaitConnection(ctx))
		for {
			_, err = c.Twin(ctx)
			if err == nil || ctx.Err() != nil {
				break
			}
		}
		require.NoError(t, err, "twin")
		require.NoError(t, c.Send(ctx, hub.Message{Payload: fmt.Appendf(nil, `{"n":%d}`, n)}))
		_, err = srv.WaitTelemetry(ctx, "gw-hubfault", n)
		require.NoError(t, err, "telemetry %d arrives", n)
	}
	sent := 1
	session(t, sent)
	base := measure()

	survived := 0
	for _, tc := range sweepFaults(16, true) {
		f := tc.fault
		if f.Action == faultnet.Stall && f.AfterRecords > 1 && !long() {
			continue // seconds each: the short form stalls the first records only
		}
		before, accepted := len(p.Fired()), p.Accepted()
		p.Inject(f)
		sent++
		t.Run(tc.name, func(t *testing.T) { session(t, sent) })
		if len(p.Fired()) > before {
			survived++
			assert.LessOrEqual(t, p.Accepted()-accepted, 6, "%s: bounded reconnections", tc.name)
		}
	}
	t.Logf("hub: %d faults survived", survived)
	assert.Greater(t, survived, 30)
	checkNoGrowth(t, base, 4, "after the hub fault sweep")
}

package dps_test

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"net"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"go.uber.org/goleak"

	"github.com/unicity-iot/unicity/attest"
	"github.com/unicity-iot/unicity/attest/attesttest"
	"github.com/unicity-iot/unicity/dps"
	"github.com/unicity-iot/unicity/dps/dpstest"
	"github.com/unicity-iot/unicity/internal/dial"
	"github.com/unicity-iot/unicity/internal/dial/dialtest"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// fakeClock fires every wait at once (or never, when blocked) and records what was asked.
type fakeClock struct {
	mu    sync.Mutex
	waits []time.Duration
	block bool
}

func (c *fakeClock) Now() time.Time { return time.Now() }

func (c *fakeClock) After(d time.Duration) <-chan time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.waits = append(c.waits, d)
	ch := make(chan time.Time, 1)
	if !c.block {
		ch <- time.Now()
	}
	return ch
}

func (c *fakeClock) Waits() []time.Duration {
	c.mu.Lock()
	defer c.mu.Unlock()
	return append([]time.Duration(nil), c.waits...)
}

// halfJitter makes jitter deterministic: half of its range.
func halfJitter(d time.Duration) time.Duration { return d / 2 }

// progressLog collects Progress messages.
type progressLog struct {
	mu   sync.Mutex
	msgs []string
}

func (p *progressLog) add(pr dps.Progress) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.msgs = append(p.msgs, pr.Message)
}

func (p *progressLog) all() []string {
	p.mu.Lock()
	defer p.mu.Unlock()
	return append([]string(nil), p.msgs...)
}

// newServer is the emulator as tests want it by default: no assignment delay and no poll
// limit, so that a fake clock that waits for nothing does not trip the limits.
func newServer(t testing.TB, opts ...func(*dpstest.Config)) *dpstest.Server {
	t.Helper()
	// Retry-after 1 s, below the client's floor of 2 s, which these tests measure.
	return dpstest.NewServer(t, append([]func(*dpstest.Config){func(c *dpstest.Config) { c.PollLimit, c.RetryAfter = 0, time.Second }}, opts...)...)
}

func deviceCert(t testing.TB, s *dpstest.Server, cn string) *tls.Certificate {
	t.Helper()
	leaf, err := s.FactoryCA().NewDevice(cn)
	require.NoError(t, err)
	tc := leaf.TLSCertificate()
	return &tc
}

// request is an X.509 request to s over MQTT with a fake clock and a progress log.
func request(t testing.TB, s *dpstest.Server, cn string) (dps.Request, *fakeClock, *progressLog) {
	t.Helper()
	return requestOver(t, s, cn, dial.TransportMQTT)
}

// transports are those whose behaviour must be the same; s.Addr() serves both.
var transports = []string{dial.TransportMQTT, dial.TransportHTTPS}

// requestOver is request over the given transport.
func requestOver(t testing.TB, s *dpstest.Server, cn, transport string) (dps.Request, *fakeClock, *progressLog) {
	t.Helper()
	clock, log := &fakeClock{}, &progressLog{}
	return dps.Request{
		Endpoint:     s.Addr(),
		IDScope:      s.IDScope(),
		Transport:    transport,
		RootCAs:      s.RootCAs(),
		Certificate:  deviceCert(t, s, cn),
		Clock:        clock,
		Jitter:       halfJitter,
		ReplyTimeout: 5 * time.Second,
		Progress:     log.add,
	}, clock, log
}

// TestRegisterTPM is the main path: an X.509 identity whose key lives in a TPM.
func TestRegisterTPM(t *testing.T) {
	tpm := attesttest.Simulator(t)
	kf, err := attest.CreateKey(tpm, attest.ECDSAP256)
	require.NoError(t, err)
	path := filepath.Join(t.TempDir(), "identity.key")
	require.NoError(t, attest.WriteKeyfile(path, kf))
	key, err := attest.LoadKey(tpm, "tpmkey:"+path)
	require.NoError(t, err)
	defer key.Close()

	s := newServer(t)
	leaf, err := s.FactoryCA().IssueDevice("gw-tpm-01", key.Public())
	require.NoError(t, err)
	id, err := attest.NewIdentity(leaf.Chain, key, time.Now())
	require.NoError(t, err)
	cert := id.TLSCertificate()

	req, clock, log := request(t, s, "unused")
	req.Certificate = &cert
	a, err := dps.Register(t.Context(), req)
	require.NoError(t, err)

	assert.Equal(t, dpstest.DefaultHub, a.AssignedHub)
	assert.Equal(t, "gw-tpm-01", a.DeviceID)
	assert.Equal(t, "gw-tpm-01", a.RegistrationID)
	assert.Equal(t, "initialAssignment", a.Substatus)
	assert.Equal(t, dial.TransportMQTT, a.Transport)
	assert.Nil(t, a.Payload)
	assert.Nil(t, a.IssuedChain)
	assert.WithinDuration(t, time.Now(), a.CreatedAt, time.Minute)
	assert.WithinDuration(t, time.Now(), a.UpdatedAt, time.Minute)
	// retry-after 1 s is raised to DPS's 2 s poll limit.
	assert.Equal(t, []time.Duration{2 * time.Second}, clock.Waits())
	assert.Equal(t, []string{"connected to DPS over mqtt", "DPS is assigning a hub; polling in 2 s"}, log.all())
	assert.Equal(t, dpstest.Stats{Connections: 1, Registrations: 1, Polls: 1, Assignments: 1}, s.Stats())
	rec, ok := s.Registration("gw-tpm-01")
	require.True(t, ok)
	assert.Equal(t, "assigned", rec.Status)
}

func TestRegisterTransports(t *testing.T) {
	s := newServer(t)
	host := dpstest.GlobalHost
	authProxy := dialtest.NewProxy(t, dialtest.WithAuth("tech", "pa:ss"),
		dialtest.WithRoute(host+":8883", s.Addr()), dialtest.WithRoute(host+":443", s.WebSocketAddr()))
	firewall := dialtest.NewProxy(t,
		dialtest.WithRoute(host+":8883", ""), dialtest.WithRoute(host+":443", s.WebSocketAddr()))

	tests := []struct {
		name, endpoint, transport, proxy string
		envProxy                         string
		want                             string
		via                              *dialtest.Proxy
		tunnels                          []string
	}{
		{name: "mqtt", endpoint: s.Addr(), transport: dial.TransportMQTT, want: dial.TransportMQTT},
		{name: "websocket", endpoint: s.WebSocketAddr(), transport: dial.TransportWebSocket, want: dial.TransportWebSocket},
		{name: "auto", endpoint: s.Addr(), transport: dial.TransportAuto, want: dial.TransportMQTT},
		{name: "mqtt via proxy", endpoint: host, transport: dial.TransportMQTT, proxy: authProxy.URL.String(),
			want: dial.TransportMQTT, via: authProxy, tunnels: []string{host + ":8883"}},
		{name: "websocket via proxy", endpoint: host, transport: dial.TransportWebSocket, proxy: authProxy.URL.String(),
			want: dial.TransportWebSocket, via: authProxy, tunnels: []string{host + ":443"}},
		{name: "proxy from https_proxy", endpoint: host, transport: dial.TransportMQTT, envProxy: authProxy.URL.String(),
			want: dial.TransportMQTT, via: authProxy, tunnels: []string{host + ":8883"}},
		{name: "auto falls back to 443 when 8883 is blocked", endpoint: host, transport: dial.TransportAuto, proxy: firewall.URL.String(),
			want: dial.TransportWebSocket, via: firewall, tunnels: []string{host + ":443"}},
		{name: "https", endpoint: s.Addr(), transport: dial.TransportHTTPS, want: dial.TransportHTTPS},
		{name: "https on the websocket port", endpoint: s.WebSocketAddr(), transport: dial.TransportHTTPS, want: dial.TransportHTTPS},
		{name: "https via proxy", endpoint: host, transport: dial.TransportHTTPS, proxy: authProxy.URL.String(),
			want: dial.TransportHTTPS, via: authProxy, tunnels: []string{host + ":443"}},
		{name: "https via proxy from https_proxy", endpoint: host, transport: dial.TransportHTTPS, envProxy: authProxy.URL.String(),
			want: dial.TransportHTTPS, via: authProxy, tunnels: []string{host + ":443"}},
	}
	for i, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Setenv("HTTPS_PROXY", tt.envProxy)
			t.Setenv("https_proxy", tt.envProxy)
			var before []string
			if tt.via != nil {
				before = tt.via.Tunnels()
			}
			cn := "gw-transport-" + string(rune('a'+i))
			req, _, _ := request(t, s, cn)
			req.Endpoint, req.Transport, req.Proxy = tt.endpoint, tt.transport, tt.proxy
			a, err := dps.Register(t.Context(), req)
			require.NoError(t, err)
			assert.Equal(t, cn, a.DeviceID)
			assert.Equal(t, tt.want, a.Transport)
			if tt.via != nil {
				assert.Equal(t, tt.tunnels, tt.via.Tunnels()[len(before):])
			}
		})
	}
}

func TestRegisterSymmetricKey(t *testing.T) {
	s := newServer(t)
	individualKey := []byte("individual-device-key-0123456789")
	groupKey := []byte("group-key-0123456789abcdefghijkl")
	require.NoError(t, s.AddIndividual(dpstest.Individual{RegistrationID: "sas-dev-1", SymmetricKey: individualKey, DeviceID: "sas-device-one"}))
	require.NoError(t, s.AddGroup(dpstest.Group{ID: "sas-group", SymmetricKey: groupKey}))

	tests := []struct {
		name, regID string
		key         []byte
		group       bool
		wantDevice  string
	}{
		{"individual", "sas-dev-1", individualKey, false, "sas-device-one"},
		{"group-derived", "sas-dev-2", groupKey, true, "sas-dev-2"},
	}
	for _, transport := range transports {
		for _, tt := range tests {
			t.Run(transport+"/"+tt.name, func(t *testing.T) {
				req, _, _ := requestOver(t, s, "unused", transport)
				req.Certificate, req.RegistrationID, req.SymmetricKey, req.GroupKey = nil, tt.regID, tt.key, tt.group
				a, err := dps.Register(t.Context(), req)
				require.NoError(t, err)
				assert.Equal(t, tt.wantDevice, a.DeviceID)
				assert.Equal(t, tt.regID, a.RegistrationID)
				assert.Equal(t, transport, a.Transport)
			})
		}
	}
}

// TestRegisterCertificateIssuance: a CSR for an operational key in the TPM, P-256 and P-384,
// and what DPS answers when it will not issue.
func TestRegisterCertificateIssuance(t *testing.T) {
	s := newServer(t)
	require.NoError(t, s.SetCredentialPolicy("factory", &dpstest.CredentialPolicy{Name: "ops", Validity: time.Hour}))
	tpm := attesttest.Simulator(t)
	for _, alg := range []attest.KeyAlgorithm{attest.ECDSAP256, attest.ECDSAP384} {
		t.Run(string(alg), func(t *testing.T) {
			key, err := attest.NewOperationalKey(tpm, alg, filepath.Join(t.TempDir(), "operational.key"))
			require.NoError(t, err)
			defer key.Destroy()
			req, _, _ := request(t, s, "gw-csr-"+string(alg))
			req.CSRSigner = key
			a, err := dps.Register(t.Context(), req)
			require.NoError(t, err)

			id, err := attest.IssuedIdentity(a.IssuedChain, key, time.Now())
			require.NoError(t, err, "leaf first, for the operational key")
			leaf := id.Chain[0]
			assert.Equal(t, "gw-csr-"+string(alg), leaf.Subject.CommonName)
			assert.Equal(t, time.Hour, leaf.NotAfter.Sub(leaf.NotBefore))
			_, err = leaf.Verify(x509.VerifyOptions{Roots: s.RootCAs(), Intermediates: pool(id.Chain[1:]...), KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}})
			assert.NoError(t, err, "issued by the emulator's issuing CA")
		})
	}

	p256, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	require.NoError(t, err)
	rsaKey, err := rsa.GenerateKey(rand.Reader, 2048)
	require.NoError(t, err)
	refusals := []struct {
		name   string
		key    crypto.Signer
		setup  func()
		is     error
		status int
	}{
		{"RSA key", rsaKey, func() {}, dps.ErrRefused, 400},
		{"MQTT 5 hub", p256, func() { s.SetConnectionProfile(dpstest.DefaultHub, dpstest.ProfileMQTTv5) }, dps.ErrMQTT5, 200},
		{"unknown connection profile", p256, func() { s.SetConnectionProfile(dpstest.DefaultHub, "mqttV7") }, dps.ErrConnectionProfile, 200},
		{"enrollment without a policy", p256, func() {
			s.SetConnectionProfile(dpstest.DefaultHub, dpstest.ProfileClassic)
			require.NoError(t, s.SetCredentialPolicy("factory", nil))
		}, dps.ErrNotIssued, 200},
	}
	for _, tt := range refusals {
		t.Run(tt.name, func(t *testing.T) {
			tt.setup()
			before := s.Stats().Registrations
			req, _, _ := request(t, s, "gw-refused")
			req.CSRSigner = tt.key
			_, err := dps.Register(t.Context(), req)
			require.ErrorIs(t, err, tt.is)
			assert.ErrorIs(t, err, dps.ErrRefused, "permanent")
			var e *dps.Error
			require.ErrorAs(t, err, &e)
			if tt.status != 200 {
				assert.Equal(t, tt.status, e.Status)
			}
			assert.Equal(t, before+1, s.Stats().Registrations, "not retried")
		})
	}
}

func pool(certs ...*x509.Certificate) *x509.CertPool {
	p := x509.NewCertPool()
	for _, c := range certs {
		p.AddCert(c)
	}
	return p
}

// allocateWith replaces the factory enrollment's policy with a custom allocation function.
func allocateWith(t testing.TB, s *dpstest.Server, f dpstest.AllocateFunc) {
	t.Helper()
	require.NoError(t, s.AddGroup(dpstest.Group{ID: "factory", CA: s.FactoryCA().Certificate, Policy: dpstest.Policy{Allocate: f}}))
}

func TestRegisterPayload(t *testing.T) {
	s := newServer(t)
	var mu sync.Mutex
	var sent json.RawMessage
	allocateWith(t, s, func(r dpstest.AllocationRequest) (dpstest.AllocationResult, error) {
		mu.Lock()
		defer mu.Unlock()
		sent = r.Payload
		return dpstest.AllocationResult{Hub: r.LinkedHubs[0], Payload: json.RawMessage(`{"site":"plant-7","slot":[1,2]}`)}, nil
	})
	req, _, _ := request(t, s, "gw-payload")
	req.Payload = json.RawMessage(`{"modelId":"dtmi:com:example:gw;1"}`)
	a, err := dps.Register(t.Context(), req)
	require.NoError(t, err)
	mu.Lock()
	assert.JSONEq(t, `{"modelId":"dtmi:com:example:gw;1"}`, string(sent))
	mu.Unlock()
	assert.JSONEq(t, `{"site":"plant-7","slot":[1,2]}`, string(a.Payload))

	for _, bad := range []string{`[1,2]`, `{"a":`, `null`, `"x"`} {
		req.Payload = json.RawMessage(bad)
		_, err := dps.Register(t.Context(), req)
		assert.ErrorContains(t, err, "custom allocation payload is not a JSON object", bad)
	}
}

// TestRegisterRefused covers the permanent errors: each returns at once, matches ErrRefused
// and says what is wrong in words a technician understands.
func TestRegisterRefused(t *testing.T) {
	wrongSymmetricKey := func(t *testing.T, s *dpstest.Server, req *dps.Request) {
		require.NoError(t, s.AddIndividual(dpstest.Individual{RegistrationID: "sas-ref", SymmetricKey: []byte("right-key")}))
		req.Certificate, req.RegistrationID, req.SymmetricKey = nil, "sas-ref", []byte("wrong-key")
	}
	tests := []struct {
		name     string
		server   []func(*dpstest.Config)
		setup    func(t *testing.T, s *dpstest.Server, req *dps.Request)
		want     string // the whole message when exact, else a part of it
		exact    bool
		status   int
		code     int
		mqttOnly bool // CONNECT, which HTTPS does not have
	}{
		{name: "registration ID is not the certificate CN", exact: true,
			setup: func(t *testing.T, s *dpstest.Server, req *dps.Request) {
				req.Certificate, req.RegistrationID = deviceCert(t, s, "GW-001"), "gw-01"
			},
			want: "registration ID 'gw-01' does not match certificate CN 'GW-001'"},
		{name: "unknown certificate refused at CONNECT",
			setup: func(t *testing.T, s *dpstest.Server, req *dps.Request) {
				require.NoError(t, s.RemoveEnrollment("factory"))
			},
			want: "DPS refused the connection (CONNACK 5): no enrollment matches this certificate (registration ID 'gw-ref')", mqttOnly: true},
		{name: "unknown certificate refused with 401",
			server: []func(*dpstest.Config){func(c *dpstest.Config) { c.UnknownDevice = dpstest.Refuse401 }},
			setup: func(t *testing.T, s *dpstest.Server, req *dps.Request) {
				require.NoError(t, s.RemoveEnrollment("factory"))
			},
			want: "no enrollment matches this certificate (registration ID 'gw-ref')", status: 401, code: 401002},
		{name: "enrollment disabled",
			setup: func(t *testing.T, s *dpstest.Server, req *dps.Request) {
				require.NoError(t, s.SetEnabled("factory", false))
			},
			want: "enrollment disabled for registration ID 'gw-ref'", status: 200},
		{name: "allocation failed",
			setup: func(t *testing.T, s *dpstest.Server, req *dps.Request) {
				allocateWith(t, s, func(dpstest.AllocationRequest) (dpstest.AllocationResult, error) {
					return dpstest.AllocationResult{}, errors.New("no such site")
				})
			},
			want: "DPS could not assign a hub", status: 200, code: 400207},
		{name: "wrong symmetric key refused at CONNECT",
			setup: wrongSymmetricKey,
			want:  "DPS did not accept the symmetric key for registration ID 'sas-ref'", mqttOnly: true},
		{name: "wrong symmetric key refused with 401",
			server: []func(*dpstest.Config){func(c *dpstest.Config) { c.UnknownDevice = dpstest.Refuse401 }},
			setup:  wrongSymmetricKey,
			want:   "DPS did not accept the symmetric key for registration ID 'sas-ref'", status: 401, code: 401000},
		{name: "bad request",
			setup: func(t *testing.T, s *dpstest.Server, req *dps.Request) {
				s.AddFault(dpstest.Fault{Step: dpstest.StepRegister, Action: dpstest.Status, Status: 400})
			},
			want: "DPS rejected the registration request (400)", status: 400, code: 400000},
		{name: "not found",
			setup: func(t *testing.T, s *dpstest.Server, req *dps.Request) {
				s.AddFault(dpstest.Fault{Step: dpstest.StepRegister, Action: dpstest.Status, Status: 404})
			},
			want: "no enrollment matches registration ID 'gw-ref' in ID scope", status: 404, code: 404000},
		{name: "precondition failed",
			setup: func(t *testing.T, s *dpstest.Server, req *dps.Request) {
				s.AddFault(dpstest.Fault{Step: dpstest.StepRegister, Action: dpstest.Status, Status: 412})
			},
			want: "precondition failed", status: 412, code: 412000},
		{name: "CONNACK bad username or password",
			setup: func(t *testing.T, s *dpstest.Server, req *dps.Request) {
				s.AddFault(dpstest.Fault{Step: dpstest.StepConnect, Action: dpstest.Status, Status: 4})
			},
			want: "DPS refused the connection (CONNACK 4)", mqttOnly: true},
	}
	for _, transport := range transports {
		for _, tt := range tests {
			if tt.mqttOnly && transport != dial.TransportMQTT {
				continue
			}
			t.Run(transport+"/"+tt.name, func(t *testing.T) {
				s := newServer(t, tt.server...)
				req, _, log := requestOver(t, s, "gw-ref", transport)
				tt.setup(t, s, &req)
				_, err := dps.Register(t.Context(), req)
				require.Error(t, err)
				assert.ErrorIs(t, err, dps.ErrRefused)
				assert.NotErrorIs(t, err, dps.ErrUnreachable)
				var e *dps.Error
				require.ErrorAs(t, err, &e)
				assert.False(t, e.Temporary())
				if tt.exact {
					assert.Equal(t, tt.want, err.Error())
				} else {
					assert.Contains(t, err.Error(), tt.want)
				}
				assert.Equal(t, tt.status, e.Status)
				assert.Equal(t, tt.code, e.ErrorCode)
				if tt.status >= 400 {
					assert.NotEmpty(t, e.TrackingID)
				}
				for _, m := range log.all() {
					assert.NotContains(t, m, "retrying", "permanent errors are not retried")
				}
			})
		}
	}
}

// TestRegisterFaults runs every scripted emulator fault once: each is survived, with the
// waits the protocol asks for.
func TestRegisterFaults(t *testing.T) {
	tests := []struct {
		name      string
		fault     dpstest.Fault
		wantWaits []time.Duration // nil: not checked
		wantMsg   string          // a progress message, "" for none
		httpsMsg  string          // the message over HTTPS when it differs
		wantStats func(t *testing.T, st dpstest.Stats, transport string)
		mqttOnly  bool // connect, subscribe and $rid, which HTTPS does not have
	}{
		{name: "drop at connect", fault: dpstest.Fault{Step: dpstest.StepConnect, Action: dpstest.Drop, Times: 1}, mqttOnly: true},
		{name: "drop at subscribe", fault: dpstest.Fault{Step: dpstest.StepSubscribe, Action: dpstest.Drop, Times: 1}, mqttOnly: true},
		{name: "subscription refused", fault: dpstest.Fault{Step: dpstest.StepSubscribe, Action: dpstest.Status, Times: 1},
			wantMsg: "DPS refused the subscription", mqttOnly: true},
		{name: "drop at register", fault: dpstest.Fault{Step: dpstest.StepRegister, Action: dpstest.Drop, Times: 1},
			wantMsg: "the connection to DPS dropped before DPS acknowledged the request", httpsMsg: "the connection to DPS dropped while waiting for its reply"},
		{name: "drop after the register reply resumes polling", fault: dpstest.Fault{Step: dpstest.StepRegister, Action: dpstest.DropAfterReply, Times: 1},
			wantStats: func(t *testing.T, st dpstest.Stats, transport string) {
				assert.Equal(t, int64(1), st.Registrations, "the cached operationId is polled, not re-registered")
				if transport == dial.TransportMQTT {
					assert.Equal(t, int64(2), st.Connections)
				}
			}},
		{name: "drop at poll", fault: dpstest.Fault{Step: dpstest.StepPoll, Action: dpstest.Drop, Times: 1},
			wantStats: func(t *testing.T, st dpstest.Stats, _ string) {
				assert.Equal(t, int64(1), st.Registrations)
				assert.Equal(t, int64(2), st.Polls)
			}},
		{name: "drop after the poll reply", fault: dpstest.Fault{Step: dpstest.StepPoll, Action: dpstest.DropAfterReply, Times: 1}},
		{name: "CONNACK server unavailable", fault: dpstest.Fault{Step: dpstest.StepConnect, Action: dpstest.Status, Status: 3, Times: 1},
			wantMsg: "DPS is unavailable (CONNACK 3: server unavailable); retrying in", mqttOnly: true},
		{name: "500 at register", fault: dpstest.Fault{Step: dpstest.StepRegister, Action: dpstest.Status, Status: 500, Times: 1},
			wantWaits: []time.Duration{2 * time.Second, 2 * time.Second}, wantMsg: "DPS had an internal error: DPS says 'scripted fault'; retrying in 2 s"},
		{name: "503 at poll", fault: dpstest.Fault{Step: dpstest.StepPoll, Action: dpstest.Status, Status: 503, Times: 1},
			wantStats: func(t *testing.T, st dpstest.Stats, _ string) { assert.Equal(t, int64(1), st.Registrations) }},
		{name: "429 with retry-after", fault: dpstest.Fault{Step: dpstest.StepRegister, Action: dpstest.Status, Status: 429, RetryAfter: 40 * time.Second, Times: 1},
			wantWaits: []time.Duration{40 * time.Second, 2 * time.Second}, wantMsg: "throttled by DPS: DPS says 'scripted fault'; retrying in 40 s"},
		{name: "429 without retry-after", fault: dpstest.Fault{Step: dpstest.StepPoll, Action: dpstest.Status, Status: 429, Times: 1},
			wantWaits: []time.Duration{2 * time.Second, 2 * time.Second}, wantMsg: "throttled by DPS: DPS says 'scripted fault'; retrying in 2 s"},
		{name: "malformed register reply", fault: dpstest.Fault{Step: dpstest.StepRegister, Action: dpstest.Malformed, Times: 1},
			wantMsg: "DPS sent a reply this agent cannot use"},
		{name: "malformed poll reply", fault: dpstest.Fault{Step: dpstest.StepPoll, Action: dpstest.Malformed, Times: 1},
			wantMsg: "DPS sent a reply this agent cannot use"},
		{name: "oversized reply", fault: dpstest.Fault{Step: dpstest.StepRegister, Action: dpstest.Oversized, Times: 1},
			wantMsg: "DPS sent a reply this agent cannot use"},
		{name: "wrong $rid is ignored", fault: dpstest.Fault{Step: dpstest.StepRegister, Action: dpstest.WrongRID, Times: 1},
			wantMsg: "DPS did not reply within", mqttOnly: true},
		{name: "reply later than the timeout", fault: dpstest.Fault{Step: dpstest.StepPoll, Action: dpstest.Delay, Delay: time.Minute, Times: 1},
			wantMsg: "DPS did not reply within"},
		{name: "poll of a forgotten operation registers again", fault: dpstest.Fault{Step: dpstest.StepPoll, Action: dpstest.Status, Status: 404, Times: 1},
			wantMsg:   "DPS no longer knows the registration operation; registering again",
			wantStats: func(t *testing.T, st dpstest.Stats, _ string) { assert.Equal(t, int64(2), st.Registrations) }},
	}
	for _, transport := range transports {
		for _, tt := range tests {
			if tt.mqttOnly && transport != dial.TransportMQTT {
				continue
			}
			t.Run(transport+"/"+tt.name, func(t *testing.T) {
				s := newServer(t, func(c *dpstest.Config) { c.Faults = []dpstest.Fault{tt.fault} })
				req, clock, log := requestOver(t, s, "gw-fault", transport)
				req.ReplyTimeout = 500 * time.Millisecond
				a, err := dps.Register(t.Context(), req)
				require.NoError(t, err)
				assert.Equal(t, dpstest.DefaultHub, a.AssignedHub)
				if tt.wantWaits != nil {
					assert.Equal(t, tt.wantWaits, clock.Waits())
				}
				want := tt.wantMsg
				if tt.httpsMsg != "" && transport == dial.TransportHTTPS {
					want = tt.httpsMsg
				}
				if want != "" {
					assert.True(t, containsPrefix(log.all(), want), "progress %q in %q", want, log.all())
				}
				if tt.wantStats != nil {
					tt.wantStats(t, s.Stats(), transport)
				}
			})
		}
	}
}

func containsPrefix(msgs []string, prefix string) bool {
	for _, m := range msgs {
		if strings.HasPrefix(m, prefix) {
			return true
		}
	}
	return false
}

// TestRegisterGivesUp: temporary errors are retried until the context ends; then the call
// returns the last of them, classified for the exit code.
func TestRegisterGivesUp(t *testing.T) {
	for _, transport := range transports {
		t.Run(transport, func(t *testing.T) { testRegisterGivesUp(t, transport) })
	}
}

func testRegisterGivesUp(t *testing.T, transport string) {
	t.Run("throttled", func(t *testing.T) {
		s := newServer(t, func(c *dpstest.Config) {
			c.Faults = []dpstest.Fault{{Step: dpstest.StepRegister, Action: dpstest.Status, Status: 429, RetryAfter: 40 * time.Second}}
		})
		req, _, _ := requestOver(t, s, "gw-throttled", transport)
		ctx, cancel := context.WithCancel(t.Context())
		defer cancel()
		retries := 0
		req.Progress = func(p dps.Progress) {
			if p.Err != nil {
				if retries++; retries == 3 {
					cancel()
				}
			}
		}
		_, err := dps.Register(ctx, req)
		require.ErrorIs(t, err, context.Canceled)
		var e *dps.Error
		require.ErrorAs(t, err, &e)
		assert.True(t, e.Temporary())
		assert.Equal(t, 429, e.Status)
		assert.Equal(t, 40*time.Second, e.RetryAfter)
		assert.NotErrorIs(t, err, dps.ErrRefused)
		assert.NotErrorIs(t, err, dps.ErrUnreachable)
		assert.Contains(t, err.Error(), "throttled by DPS")
	})
	t.Run("unreachable", func(t *testing.T) {
		s := newServer(t)
		req, _, _ := requestOver(t, s, "gw-untrusted", transport)
		req.RootCAs = nil // Azure's roots do not know the emulator
		ctx, cancel := context.WithCancel(t.Context())
		defer cancel()
		var backoffs []time.Duration
		req.Progress = func(p dps.Progress) {
			if p.Err != nil {
				if backoffs = append(backoffs, p.Wait); len(backoffs) == 4 {
					cancel()
				}
			}
		}
		req.Jitter = func(d time.Duration) time.Duration { return d - 1 } // the top of the range
		_, err := dps.Register(ctx, req)
		require.ErrorIs(t, err, dps.ErrUnreachable)
		assert.ErrorIs(t, err, context.Canceled)
		assert.NotErrorIs(t, err, dps.ErrRefused)
		assert.Contains(t, err.Error(), "cannot reach DPS at "+s.Addr())
		assert.Contains(t, err.Error(), "certificate signed by unknown authority")
		assert.Equal(t, []time.Duration{time.Second - 1, 2*time.Second - 1, 4*time.Second - 1, 8*time.Second - 1}, backoffs, "exponential")
	})
}

// TestRegisterCancel cancels the context at every wait: the call returns promptly with the
// context's error and leaves no goroutine behind.
func TestRegisterCancel(t *testing.T) {
	tests := []struct {
		name     string
		setup    func(t *testing.T, s *dpstest.Server, req *dps.Request, clock *fakeClock, cancel func())
		mqttOnly bool
	}{
		{name: "during the TLS handshake", setup: func(t *testing.T, s *dpstest.Server, req *dps.Request, _ *fakeClock, cancel func()) {
			req.Endpoint = silentListener(t, cancel)
		}},
		{name: "during the WebSocket handshake", mqttOnly: true, setup: func(t *testing.T, s *dpstest.Server, req *dps.Request, _ *fakeClock, cancel func()) {
			req.Endpoint, req.Transport = silentListener(t, cancel), dial.TransportWebSocket
		}},
		{name: "waiting for CONNACK", mqttOnly: true, setup: func(t *testing.T, s *dpstest.Server, req *dps.Request, _ *fakeClock, cancel func()) {
			s.AddFault(dpstest.Fault{Step: dpstest.StepConnect, Action: dpstest.Delay, Delay: time.Hour})
			time.AfterFunc(200*time.Millisecond, cancel)
		}},
		{name: "waiting for the register reply", setup: func(t *testing.T, s *dpstest.Server, req *dps.Request, _ *fakeClock, cancel func()) {
			s.AddFault(dpstest.Fault{Step: dpstest.StepRegister, Action: dpstest.Delay, Delay: time.Hour})
			time.AfterFunc(200*time.Millisecond, cancel)
		}},
		{name: "waiting to poll", setup: func(t *testing.T, s *dpstest.Server, req *dps.Request, clock *fakeClock, cancel func()) {
			clock.block = true
			req.Progress = func(p dps.Progress) {
				if strings.HasPrefix(p.Message, "DPS is assigning") {
					cancel()
				}
			}
		}},
		{name: "waiting to retry", setup: func(t *testing.T, s *dpstest.Server, req *dps.Request, clock *fakeClock, cancel func()) {
			clock.block = true
			s.AddFault(dpstest.Fault{Step: dpstest.StepRegister, Action: dpstest.Status, Status: 500})
			req.Progress = func(p dps.Progress) {
				if p.Err != nil {
					cancel()
				}
			}
		}},
	}
	for _, transport := range transports {
		for _, tt := range tests {
			if tt.mqttOnly && transport != dial.TransportMQTT {
				continue
			}
			t.Run(transport+"/"+tt.name, func(t *testing.T) {
				s := newServer(t)
				// Checked after the test's other cleanups have closed its listeners. dpstest's
				// delayed CONNACK waits for the server to close, and its HTTP server, started
				// by the first HTTPS request, lives as long as it does: neither is ours to check.
				ignore := goleak.IgnoreCurrent()
				t.Cleanup(func() {
					goleak.VerifyNone(t, ignore, goleak.IgnoreTopFunction("github.com/unicity-iot/unicity/dps/dpstest.(*Server).sleep"),
						goleak.IgnoreTopFunction("github.com/unicity-iot/unicity/internal/mqttsrv.(*connListener).Accept"))
				})
				req, clock, _ := requestOver(t, s, "gw-cancel", transport)
				req.ReplyTimeout = time.Hour
				ctx, cancel := context.WithCancel(t.Context())
				defer cancel()
				tt.setup(t, s, &req, clock, cancel)
				start := time.Now()
				_, err := dps.Register(ctx, req)
				require.ErrorIs(t, err, context.Canceled)
				assert.Less(t, time.Since(start), 10*time.Second)
			})
		}
	}
}

// silentListener accepts connections and never answers; the first accept cancels.
func silentListener(t *testing.T, cancel func()) string {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	var conns []net.Conn
	done := make(chan struct{})
	go func() {
		defer close(done)
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			conns = append(conns, c)
			cancel()
		}
	}()
	t.Cleanup(func() {
		ln.Close()
		<-done
		for _, c := range conns {
			c.Close()
		}
	})
	return ln.Addr().String()
}

package hub_test

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"io"
	"net"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"go.uber.org/goleak"

	"github.com/unicity-iot/unicity/attest"
	"github.com/unicity-iot/unicity/attest/attesttest"
	"github.com/unicity-iot/unicity/hub"
	"github.com/unicity-iot/unicity/hub/hubtest"
	"github.com/unicity-iot/unicity/internal/dial"
	"github.com/unicity-iot/unicity/internal/dial/dialtest"
	"github.com/unicity-iot/unicity/internal/pki"
)

// A paho call abandoned on a dead connection ends by itself within WriteTimeout, after Run
// has returned (see handoff); any other goroutine left behind is a leak.
func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m, goleak.IgnoreAnyFunction("github.com/unicity-iot/unicity/hub.(*Client).handoff.func1"))
}

// fastBackoff keeps reconnection tests quick without disabling the backoff path.
func fastBackoff(int) time.Duration { return 5 * time.Millisecond }

func testContext(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	t.Cleanup(cancel)
	return ctx
}

// deviceCA issues device certificates; the emulated hub trusts it for every device.
type deviceCA struct{ *pki.CA }

func newDeviceCA(t testing.TB) deviceCA {
	ca, err := pki.NewRoot("device root")
	require.NoError(t, err)
	return deviceCA{ca}
}

// softwareDevice registers id with h and returns its software-key identity.
func (ca deviceCA) softwareDevice(t testing.TB, h *hubtest.Hub, id string) tls.Certificate {
	leaf, err := ca.NewDevice(id)
	require.NoError(t, err)
	ca.register(t, h, id)
	return leaf.TLSCertificate()
}

func (ca deviceCA) register(t testing.TB, h *hubtest.Hub, id string) {
	require.NoError(t, h.Register(hubtest.Device{ID: id, CAs: []*x509.Certificate{ca.Root()}}))
}

// tpmDevice registers id with h and returns an identity whose key lives in the TPM simulator.
func (ca deviceCA) tpmDevice(t *testing.T, h *hubtest.Hub, id string) tls.Certificate {
	tpm := attesttest.Simulator(t)
	kf, err := attest.CreateKey(tpm, attest.ECDSAP256)
	require.NoError(t, err)
	path := filepath.Join(t.TempDir(), "identity.key")
	require.NoError(t, attest.WriteKeyfile(path, kf))
	key, err := attest.LoadKey(tpm, "tpmkey:"+path)
	require.NoError(t, err)
	t.Cleanup(func() { key.Close() })
	leaf, err := ca.IssueDevice(id, key.Public())
	require.NoError(t, err)
	ident, err := attest.NewIdentity(leaf.Chain, key, time.Now())
	require.NoError(t, err)
	ca.register(t, h, id)
	return ident.TLSCertificate()
}

// running is a client whose Run goroutine the test controls.
type running struct {
	*hub.Client
	cancel context.CancelFunc
	done   chan error

	mu     sync.Mutex
	states []hub.State
}

// config is a client configuration for a device of srv.
func config(srv *hubtest.Server, id string, cert tls.Certificate) hub.Config {
	return hub.Config{
		Hub:      srv.Name(),
		DeviceID: id,
		Dial:     dial.Config{Transport: dial.TransportMQTT, RootCAs: srv.RootCAs(), Certificate: &cert},
		Backoff:  fastBackoff,
		// Bounds the paho calls abandoned when a test cuts a connection under them.
		WriteTimeout: time.Second,
	}
}

// start runs a client until the test ends.
func start(t *testing.T, cfg hub.Config) *running {
	t.Helper()
	r := &running{done: make(chan error, 1)}
	onState := cfg.OnState
	cfg.OnState = func(s hub.State) {
		r.mu.Lock()
		r.states = append(r.states, s)
		r.mu.Unlock()
		if onState != nil {
			onState(s)
		}
	}
	c, err := hub.New(cfg)
	require.NoError(t, err)
	r.Client = c
	ctx, cancel := context.WithCancel(context.Background())
	r.cancel = cancel
	go func() { r.done <- c.Run(ctx) }()
	t.Cleanup(func() { r.stop(t) })
	return r
}

// stop ends Run and checks that it returned because it was told to.
func (r *running) stop(t *testing.T) {
	r.cancel()
	select {
	case err, ok := <-r.done:
		if ok {
			assert.ErrorIs(t, err, context.Canceled)
			close(r.done)
		}
	case <-time.After(20 * time.Second):
		t.Fatal("Run did not return after cancel")
	}
}

func (r *running) connected(t *testing.T) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	require.NoError(t, r.AwaitConnection(ctx))
}

func TestTelemetryWithTPMKey(t *testing.T) {
	srv := hubtest.NewServer(t)
	ca := newDeviceCA(t)
	cert := ca.tpmDevice(t, srv.Hub, "gw-tpm")
	cfg := config(srv, "gw-tpm", cert)
	cfg.ModelID = "dtmi:com:example:gw;1"
	c := start(t, cfg)
	ctx := testContext(t)

	msg := hub.Message{
		Payload: []byte(`{"temp":21.5}`),
		Properties: map[string]string{
			"alert":                 "high & dry",
			hub.PropContentType:     "application/json",
			hub.PropContentEncoding: "utf-8",
			hub.PropMessageID:       "m-1",
		},
	}
	require.NoError(t, c.Send(ctx, msg))

	got := srv.Telemetry("gw-tpm")
	require.Len(t, got, 1, "Send returns once PUBACKed, so the hub has the message")
	assert.JSONEq(t, `{"temp":21.5}`, string(got[0].Payload))
	assert.Equal(t, map[string]string{"alert": "high & dry"}, got[0].Properties)
	assert.Equal(t, map[string]string{"$.ct": "application/json", "$.ce": "utf-8", "$.mid": "m-1"}, got[0].System)
	assert.Equal(t, byte(1), got[0].QoS)

	info, err := srv.Device("gw-tpm")
	require.NoError(t, err)
	assert.True(t, info.Connected)
	assert.Equal(t, "unicity/dev", info.ClientType)
	assert.Equal(t, "2021-04-12", info.APIVersion)
	assert.Equal(t, "dtmi:com:example:gw;1", info.ModelID)
	st := c.State()
	assert.True(t, st.Connected)
	assert.Equal(t, dial.TransportMQTT, st.Transport)
}

func TestTelemetryOverWebSocket(t *testing.T) {
	srv := hubtest.NewServer(t)
	ca := newDeviceCA(t)
	cert := ca.softwareDevice(t, srv.Hub, "gw-ws")
	cfg := config(srv, "gw-ws", cert)
	_, port, _ := net.SplitHostPort(srv.WebSocketAddr)
	cfg.Hub = "localhost:" + port
	cfg.Dial.Transport = dial.TransportWebSocket
	c := start(t, cfg)
	require.NoError(t, c.Send(testContext(t), hub.Message{Payload: []byte("over 443")}))
	assert.Equal(t, "over 443", string(srv.Telemetry("gw-ws")[0].Payload))
	assert.Equal(t, dial.TransportWebSocket, c.State().Transport)
}

func TestCloudToDevice(t *testing.T) {
	srv := hubtest.NewServer(t)
	ca := newDeviceCA(t)
	cert := ca.softwareDevice(t, srv.Hub, "gw-c2d")
	got := make(chan hub.Message, 10)
	cfg := config(srv, "gw-c2d", cert)
	cfg.OnMessage = func(_ context.Context, m hub.Message) bool { got <- m; return true }
	c := start(t, cfg)
	c.connected(t)

	id, err := srv.SendC2D("gw-c2d", []byte("reboot at 3"), map[string]string{"kind": "cmd/x y", "$.ct": "text/plain"})
	require.NoError(t, err)
	select {
	case m := <-got:
		assert.Equal(t, "reboot at 3", string(m.Payload))
		assert.Equal(t, "cmd/x y", m.Properties["kind"])
		assert.Equal(t, "text/plain", m.Properties[hub.PropContentType])
		assert.Equal(t, id, m.Properties[hub.PropMessageID])
		assert.Equal(t, "/devices/gw-c2d/messages/deviceBound", m.Properties[hub.PropTo])
	case <-time.After(10 * time.Second):
		t.Fatal("no cloud-to-device message")
	}
	// Completed (PUBACKed) once handled.
	require.NoError(t, srv.Await(testContext(t), func() bool {
		p, _ := srv.PendingC2D("gw-c2d")
		return len(p) == 0
	}))
}

func TestTwin(t *testing.T) {
	srv := hubtest.NewServer(t)
	ca := newDeviceCA(t)
	cert := ca.softwareDevice(t, srv.Hub, "gw-twin")
	desired := make(chan hub.Desired, 10)
	cfg := config(srv, "gw-twin", cert)
	cfg.OnDesired = func(d hub.Desired) { desired <- d }
	c := start(t, cfg)
	ctx := testContext(t)

	// The first connection delivers the whole desired section.
	first := next(t, desired)
	assert.True(t, first.Full)

	v1, err := c.UpdateReported(ctx, json.RawMessage(`{"fw":"1.0","nested":{"a":1}}`))
	require.NoError(t, err)
	v2, err := c.UpdateReported(ctx, json.RawMessage(`{"nested":null}`))
	require.NoError(t, err)
	assert.Greater(t, v2, v1)

	twin, err := c.Twin(ctx)
	require.NoError(t, err)
	assert.Equal(t, v2, twin.ReportedVersion)
	var reported map[string]any
	require.NoError(t, json.Unmarshal(twin.Reported, &reported))
	assert.Equal(t, "1.0", reported["fw"])
	assert.NotContains(t, reported, "nested", "null removes a member")

	dv, err := srv.PatchDesired("gw-twin", []byte(`{"interval":30}`))
	require.NoError(t, err)
	patch := next(t, desired)
	assert.False(t, patch.Full)
	assert.Equal(t, int64(dv), patch.Version)
	assert.JSONEq(t, `{"interval":30,"$version":`+itoa(dv)+`}`, string(patch.Properties))

	_, err = c.UpdateReported(ctx, json.RawMessage(`[1]`))
	assert.Error(t, err, "a patch must be an object")
}

func TestDesiredResyncAfterReconnect(t *testing.T) {
	relay := newRelay(t)
	srv := hubtest.NewServer(t, hubtest.WithHostNames(relay.name)) // devices may name the hub by the relay's address
	relay.forward(srv.Addr)
	ca := newDeviceCA(t)
	cert := ca.softwareDevice(t, srv.Hub, "gw-resync")
	desired := make(chan hub.Desired, 10)
	cfg := config(srv, "gw-resync", cert)
	cfg.Hub = relay.name
	cfg.OnDesired = func(d hub.Desired) { desired <- d }
	c := start(t, cfg)
	first := next(t, desired)
	require.True(t, first.Full)

	// Cut the device off; patches made meanwhile are never notified.
	relay.block()
	relay.drop()
	require.NoError(t, srv.Await(testContext(t), func() bool { return !srv.Connected("gw-resync") }))
	_, err := srv.PatchDesired("gw-resync", []byte(`{"a":1}`))
	require.NoError(t, err)
	v, err := srv.PatchDesired("gw-resync", []byte(`{"b":2}`))
	require.NoError(t, err)
	relay.unblock()
	c.connected(t)

	full := next(t, desired)
	assert.True(t, full.Full)
	assert.Equal(t, int64(v), full.Version)
	assert.JSONEq(t, `{"a":1,"b":2,"$version":`+itoa(v)+`}`, string(full.Properties))
	select {
	case d := <-desired:
		t.Fatalf("unexpected second update %+v", d)
	case <-time.After(200 * time.Millisecond):
	}
}

func TestDirectMethods(t *testing.T) {
	srv := hubtest.NewServer(t)
	ca := newDeviceCA(t)
	cert := ca.softwareDevice(t, srv.Hub, "gw-m")
	cfg := config(srv, "gw-m", cert)
	cfg.OnMethod = func(ctx context.Context, call hub.MethodCall) hub.MethodResponse {
		switch call.Name {
		case "echo":
			return hub.MethodResponse{Status: 200, Payload: call.Payload}
		case "broken":
			return hub.MethodResponse{Status: 200, Payload: json.RawMessage(`{not json`)}
		default:
			return hub.MethodResponse{Status: 404, Payload: json.RawMessage(`{"message":"no such method"}`)}
		}
	}
	c := start(t, cfg)
	c.connected(t)
	ctx := testContext(t)

	tests := []struct {
		method, payload string
		status          int
		want            string
	}{
		{"echo", `{"x":[1,2]}`, 200, `{"x":[1,2]}`},
		{"broken", ``, 500, `{"message":"method handler answered invalid JSON"}`},
		{"nope", `null`, 404, `{"message":"no such method"}`},
	}
	for _, tt := range tests {
		t.Run(tt.method, func(t *testing.T) {
			res, err := srv.Invoke(ctx, "gw-m", tt.method, []byte(tt.payload))
			require.NoError(t, err)
			assert.Equal(t, tt.status, res.Status)
			assert.JSONEq(t, tt.want, string(res.Payload))
		})
	}
}

func TestMethodsWithoutHandler(t *testing.T) {
	srv := hubtest.NewServer(t)
	ca := newDeviceCA(t)
	c := start(t, config(srv, "gw-nm", ca.softwareDevice(t, srv.Hub, "gw-nm")))
	c.connected(t)
	res, err := srv.Invoke(testContext(t), "gw-nm", "anything", nil)
	require.NoError(t, err)
	assert.Equal(t, 501, res.Status)
}

func TestRefusedIdentity(t *testing.T) {
	tests := []struct {
		name  string
		setup func(t *testing.T, srv *hubtest.Server, ca deviceCA) tls.Certificate
	}{
		{"disabled", func(t *testing.T, srv *hubtest.Server, ca deviceCA) tls.Certificate {
			cert := ca.softwareDevice(t, srv.Hub, "gw-r")
			require.NoError(t, srv.SetDisabled("gw-r", true))
			return cert
		}},
		{"unknown device", func(t *testing.T, srv *hubtest.Server, ca deviceCA) tls.Certificate {
			leaf, err := ca.NewDevice("gw-r")
			require.NoError(t, err)
			return leaf.TLSCertificate()
		}},
		{"untrusted certificate", func(t *testing.T, srv *hubtest.Server, ca deviceCA) tls.Certificate {
			ca.register(t, srv.Hub, "gw-r")
			return newDeviceCA(t).softwareDevice(t, hubtest.NewServer(t).Hub, "gw-r")
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			srv := hubtest.NewServer(t)
			cert := tt.setup(t, srv, newDeviceCA(t))
			c, err := hub.New(config(srv, "gw-r", cert))
			require.NoError(t, err)
			err = c.Run(testContext(t))
			require.ErrorIs(t, err, hub.ErrNotAuthorized)
			var ce *hub.ConnectError
			require.ErrorAs(t, err, &ce)
			assert.Equal(t, byte(5), ce.ReturnCode)
			assert.False(t, c.State().Connected)
			assert.Equal(t, 1, srv.Stats().Refused, "an identity refusal is not retried")
		})
	}
}

func TestDisabledWhileConnected(t *testing.T) {
	srv := hubtest.NewServer(t)
	ca := newDeviceCA(t)
	cert := ca.softwareDevice(t, srv.Hub, "gw-k")
	c := start(t, config(srv, "gw-k", cert))
	c.connected(t)
	require.NoError(t, srv.SetDisabled("gw-k", true))
	select {
	case err := <-c.done:
		require.ErrorIs(t, err, hub.ErrNotAuthorized, "disabled while connected: the reconnect is refused")
		close(c.done)
	case <-time.After(20 * time.Second):
		t.Fatal("Run did not end")
	}
}

func TestSecondConnectionKicksFirst(t *testing.T) {
	srv := hubtest.NewServer(t)
	ca := newDeviceCA(t)
	cert := ca.softwareDevice(t, srv.Hub, "gw-2")
	lost := make(chan hub.State, 100)
	cfg := config(srv, "gw-2", cert)
	cfg.OnState = func(s hub.State) {
		if !s.Connected {
			lost <- s
		}
	}
	// The first client backs off long after a loss, so the second keeps the hub.
	cfg.Backoff = func(int) time.Duration { return time.Hour }
	first := start(t, cfg)
	first.connected(t)

	second := start(t, config(srv, "gw-2", cert))
	second.connected(t)
	select {
	case s := <-lost:
		assert.Error(t, s.Err)
		assert.Equal(t, time.Hour, s.Retry)
	case <-time.After(10 * time.Second):
		t.Fatal("the first connection was not told it lost the hub")
	}
	assert.False(t, first.State().Connected)
	assert.Equal(t, 1, srv.Stats().Kicked)
	require.NoError(t, second.Send(testContext(t), hub.Message{Payload: []byte("from the second")}))
}

func TestGivesUpOnUnreachableHub(t *testing.T) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	addr := l.Addr().String()
	l.Close() // nothing listens here now
	ca := newDeviceCA(t)
	leaf, err := ca.NewDevice("gw-u")
	require.NoError(t, err)
	cert := leaf.TLSCertificate()
	var attempts []int
	c, err := hub.New(hub.Config{
		Hub: addr, DeviceID: "gw-u",
		Dial:        dial.Config{Transport: dial.TransportMQTT, RootCAs: ca.Pool(), Certificate: &cert},
		Backoff:     func(attempt int) time.Duration { attempts = append(attempts, attempt); return 0 },
		MaxFailures: 3,
	})
	require.NoError(t, err)
	err = c.Run(testContext(t))
	require.ErrorIs(t, err, hub.ErrGaveUp)
	require.ErrorIs(t, err, dial.ErrUnreachable)
	assert.Equal(t, []int{1, 2}, attempts, "the backoff grows with each failure")
	assert.Equal(t, 3, c.State().Failures)
}

// TestQueueAcrossHubRestart queues telemetry while the hub is down and checks that it all
// arrives, in order, once the hub is back.
func TestQueueAcrossHubRestart(t *testing.T) {
	ca := newDeviceCA(t)
	serverCA, err := pki.NewRoot("hub root")
	require.NoError(t, err)
	l, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	addr := l.Addr().String()
	h1, err := hubtest.NewOnListeners(serverCA, l, nil, nil, nil)
	require.NoError(t, err)
	leaf, err := ca.NewDevice("gw-rs")
	require.NoError(t, err)
	cert := leaf.TLSCertificate()
	ca.register(t, h1, "gw-rs")

	down := make(chan struct{}, 10)
	c := start(t, hub.Config{
		Hub: h1.Name(), DeviceID: "gw-rs",
		Dial:    dial.Config{Transport: dial.TransportMQTT, RootCAs: serverCA.Pool(), Certificate: &cert},
		Backoff: fastBackoff,
		OnState: func(s hub.State) {
			if !s.Connected {
				down <- struct{}{}
			}
		},
	})
	ctx := testContext(t)
	require.NoError(t, c.Send(ctx, hub.Message{Payload: []byte("0")}))
	require.NoError(t, h1.Close())
	<-down

	var acks []<-chan struct{}
	for i := 1; i <= 20; i++ {
		ack, err := c.Queue().Enqueue(hub.Message{Payload: []byte(itoa(i))})
		require.NoError(t, err)
		acks = append(acks, ack)
	}
	l2, err := net.Listen("tcp", addr)
	require.NoError(t, err)
	h2, err := hubtest.NewOnListeners(serverCA, l2, nil, nil, nil)
	require.NoError(t, err)
	t.Cleanup(func() { h2.Close() })
	ca.register(t, h2, "gw-rs")
	for _, ack := range acks {
		select {
		case <-ack:
		case <-ctx.Done():
			t.Fatal("queued telemetry not acknowledged after the hub came back")
		}
	}
	var got []string
	for _, m := range h2.Telemetry("gw-rs") {
		got = append(got, string(m.Payload))
	}
	var want []string
	for i := 1; i <= 20; i++ {
		want = append(want, itoa(i))
	}
	assert.Equal(t, want, got)
}

// TestDropsMidPublish cuts the connection repeatedly while a stream of telemetry is being
// published: every message must arrive, first copies in queue order, duplicates only of
// messages in flight at a cut.
func TestDropsMidPublish(t *testing.T) {
	relay := newRelay(t)
	srv := hubtest.NewServer(t, hubtest.WithHostNames(relay.name))
	relay.forward(srv.Addr)
	ca := newDeviceCA(t)
	cert := ca.softwareDevice(t, srv.Hub, "gw-d")
	cfg := config(srv, "gw-d", cert)
	cfg.Hub = relay.name
	c := start(t, cfg)
	c.connected(t)
	ctx := testContext(t)

	const n, drops = 300, 5
	var acks []<-chan struct{}
	for i := range n {
		ack, err := c.Queue().Enqueue(hub.Message{Payload: []byte(itoa(i))})
		require.NoError(t, err)
		acks = append(acks, ack)
	}
	for d := 0; d < drops; d++ {
		// Wait for some progress, then cut.
		require.NoError(t, srv.Await(ctx, func() bool { return len(srv.Telemetry("gw-d")) >= (d+1)*n/(drops+2) }))
		relay.drop()
	}
	for _, ack := range acks {
		select {
		case <-ack:
		case <-ctx.Done():
			t.Fatal("telemetry not acknowledged")
		}
	}
	seen := map[string]int{}
	var firsts []string
	for _, m := range srv.Telemetry("gw-d") {
		p := string(m.Payload)
		if seen[p] == 0 {
			firsts = append(firsts, p)
		}
		seen[p]++
	}
	var want []string
	for i := range n {
		want = append(want, itoa(i))
	}
	assert.Equal(t, want, firsts, "nothing lost, first copies in order")
	dups := len(srv.Telemetry("gw-d")) - n
	// At most the in-flight window (32), the message being handed over and the one whose
	// PUBACK was on the wire, per cut.
	assert.LessOrEqual(t, dups, drops*34, "duplicates only of messages in flight at a cut")
	t.Logf("%d drops, %d duplicates", drops, dups)
}

func next(t *testing.T, ch <-chan hub.Desired) hub.Desired {
	t.Helper()
	select {
	case d := <-ch:
		return d
	case <-time.After(10 * time.Second):
		t.Fatal("no desired-property update")
		return hub.Desired{}
	}
}

func itoa(i int) string { b, _ := json.Marshal(i); return string(b) }

// relay forwards TCP connections to the hub and can cut them, as a flaky network does.
type relay struct {
	name   string // "localhost:port", a name the hub answers to
	target string
	l      net.Listener

	mu      sync.Mutex
	conns   map[net.Conn]struct{}
	blocked bool
	wg      sync.WaitGroup
}

func newRelay(t *testing.T) *relay {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	_, port, _ := net.SplitHostPort(l.Addr().String())
	r := &relay{name: "localhost:" + port, l: l, conns: map[net.Conn]struct{}{}}
	r.wg.Add(1)
	go r.serve()
	t.Cleanup(func() {
		l.Close()
		r.drop()
		r.wg.Wait()
	})
	return r
}

func (r *relay) serve() {
	defer r.wg.Done()
	for {
		in, err := r.l.Accept()
		if err != nil {
			return
		}
		r.mu.Lock()
		blocked, target := r.blocked, r.target
		r.mu.Unlock()
		if blocked {
			in.Close()
			continue
		}
		out, err := net.Dial("tcp", target)
		if err != nil {
			in.Close()
			continue
		}
		r.mu.Lock()
		r.conns[in], r.conns[out] = struct{}{}, struct{}{}
		r.mu.Unlock()
		r.wg.Add(2)
		pipe := func(dst, src net.Conn) {
			defer r.wg.Done()
			io.Copy(dst, src)
			dst.Close()
			src.Close()
		}
		go pipe(out, in)
		go pipe(in, out)
	}
}

// drop cuts every relayed connection.
func (r *relay) drop() {
	r.mu.Lock()
	defer r.mu.Unlock()
	for c := range r.conns {
		c.Close()
		delete(r.conns, c)
	}
}

func (r *relay) forward(target string) { r.mu.Lock(); r.target = target; r.mu.Unlock() }
func (r *relay) block()                { r.mu.Lock(); r.blocked = true; r.mu.Unlock() }
func (r *relay) unblock()              { r.mu.Lock(); r.blocked = false; r.mu.Unlock() }

func TestTwinErrorStatus(t *testing.T) {
	srv := hubtest.NewServer(t)
	ca := newDeviceCA(t)
	c := start(t, config(srv, "gw-te", ca.softwareDevice(t, srv.Hub, "gw-te")))
	c.connected(t)
	ctx := testContext(t)
	tests := []struct {
		status    int
		temporary bool
		call      func() error
	}{
		{429, true, func() error { _, err := c.Twin(ctx); return err }},
		{503, true, func() error { _, err := c.UpdateReported(ctx, json.RawMessage(`{"a":1}`)); return err }},
		{400, false, func() error { _, err := c.UpdateReported(ctx, json.RawMessage(`{"a":1}`)); return err }},
	}
	for _, tt := range tests {
		t.Run(itoa(tt.status), func(t *testing.T) {
			srv.FailTwin(1, tt.status)
			err := tt.call()
			var se *hub.StatusError
			require.ErrorAs(t, err, &se)
			assert.Equal(t, tt.status, se.Status)
			assert.Equal(t, tt.temporary, se.Temporary())
			_, err = c.Twin(ctx)
			assert.NoError(t, err, "the next request succeeds")
		})
	}
}

func TestServerUnavailableIsRetried(t *testing.T) {
	srv := hubtest.NewServer(t)
	ca := newDeviceCA(t)
	cert := ca.softwareDevice(t, srv.Hub, "gw-su")
	srv.FailConnects(2, 3)
	var mu sync.Mutex
	var failures []error
	cfg := config(srv, "gw-su", cert)
	cfg.OnState = func(s hub.State) {
		if s.Err != nil {
			mu.Lock()
			failures = append(failures, s.Err)
			mu.Unlock()
		}
	}
	c := start(t, cfg)
	c.connected(t)
	mu.Lock()
	defer mu.Unlock()
	require.Len(t, failures, 2)
	for _, err := range failures {
		var ce *hub.ConnectError
		require.ErrorAs(t, err, &ce)
		assert.True(t, ce.Temporary())
		assert.NotErrorIs(t, err, hub.ErrNotAuthorized)
	}
	assert.Equal(t, 2, srv.Stats().Refused)
}

func TestOfflineDeadlines(t *testing.T) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	addr := l.Addr().String()
	l.Close()
	ca := newDeviceCA(t)
	leaf, err := ca.NewDevice("gw-o")
	require.NoError(t, err)
	cert := leaf.TLSCertificate()
	c := start(t, hub.Config{
		Hub: addr, DeviceID: "gw-o",
		Dial:           dial.Config{Transport: dial.TransportMQTT, RootCAs: ca.Pool(), Certificate: &cert},
		Backoff:        fastBackoff,
		RequestTimeout: 50 * time.Millisecond,
	})

	ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
	defer cancel()
	err = c.Send(ctx, hub.Message{Payload: []byte("x")})
	require.ErrorIs(t, err, context.DeadlineExceeded)
	assert.Contains(t, err.Error(), "not sent")
	n, _ := c.Queue().Len()
	assert.Zero(t, n, "a message that never left is not sent later behind the caller's back")

	_, err = c.Twin(context.Background())
	require.ErrorIs(t, err, hub.ErrTimeout)
	assert.False(t, c.State().Connected)
}

// TestCloudToDeviceRedeliveredIfNotHandled cuts the connection while the application still
// holds a message: the hub's copy was never completed, so it comes again on the next one.
func TestCloudToDeviceRedeliveredIfNotHandled(t *testing.T) {
	relay := newRelay(t)
	srv := hubtest.NewServer(t, hubtest.WithHostNames(relay.name))
	relay.forward(srv.Addr)
	ca := newDeviceCA(t)
	cert := ca.softwareDevice(t, srv.Hub, "gw-rd")
	got := make(chan hub.Message, 10)
	release := make(chan struct{})
	cfg := config(srv, "gw-rd", cert)
	cfg.Hub = relay.name
	cfg.OnMessage = func(_ context.Context, m hub.Message) bool {
		got <- m
		<-release
		return true
	}
	c := start(t, cfg)
	c.connected(t)

	id, err := srv.SendC2D("gw-rd", []byte("once"), nil)
	require.NoError(t, err)
	first := <-got
	relay.drop()
	close(release)
	select {
	case again := <-got:
		assert.Equal(t, id, again.Properties[hub.PropMessageID])
		assert.Equal(t, first.Payload, again.Payload)
	case <-time.After(10 * time.Second):
		t.Fatal("the unfinished message was not redelivered")
	}
	require.NoError(t, srv.Await(testContext(t), func() bool {
		p, _ := srv.PendingC2D("gw-rd")
		return len(p) == 0
	}))
}

func TestTelemetryThroughProxy(t *testing.T) {
	srv := hubtest.NewServer(t)
	proxy := dialtest.NewProxy(t, dialtest.WithAuth("gw", "s3cret"))
	ca := newDeviceCA(t)
	cfg := config(srv, "gw-p", ca.softwareDevice(t, srv.Hub, "gw-p"))
	cfg.Dial.Proxy = proxy.URL.String()
	c := start(t, cfg)
	require.NoError(t, c.Send(testContext(t), hub.Message{Payload: []byte("via proxy")}))
	assert.Equal(t, "via proxy", string(srv.Telemetry("gw-p")[0].Payload))
	assert.Equal(t, []string{srv.Name()}, proxy.Tunnels())
}

// TestShortSessionsBackOff: connections the hub drops at once (a second agent with the same
// identity, a hub that accepts and then fails) grow the backoff as failed attempts do.
func TestShortSessionsBackOff(t *testing.T) {
	srv := hubtest.NewServer(t)
	ca := newDeviceCA(t)
	cfg := config(srv, "gw-s", ca.softwareDevice(t, srv.Hub, "gw-s"))
	var mu sync.Mutex
	var attempts []int
	cfg.Backoff = func(attempt int) time.Duration {
		mu.Lock()
		attempts = append(attempts, attempt)
		mu.Unlock()
		return 0
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	c := start(t, cfg)
	c.connected(t)
	for i := 1; i <= 3; i++ {
		require.NoError(t, srv.Disconnect("gw-s"))
		require.NoError(t, srv.Await(ctx, func() bool { return srv.Stats().Connections == i+1 && srv.Connected("gw-s") }), "%+v %v", srv.Stats(), srv.Connected("gw-s"))
	}
	mu.Lock()
	defer mu.Unlock()
	assert.Equal(t, []int{1, 2, 3}, attempts)
}

// TestReconnectWaitsOnTheClock: the backoff before a reconnect is waited on the injected
// clock, so an hour's backoff passes when the test moves the clock, not in real time.
func TestReconnectWaitsOnTheClock(t *testing.T) {
	srv := hubtest.NewServer(t)
	ca := newDeviceCA(t)
	cfg := config(srv, "gw-clock", ca.softwareDevice(t, srv.Hub, "gw-clock"))
	start0 := time.Now()
	clock := &manualClock{now: start0, armed: make(chan time.Duration, 4)}
	cfg.Clock = clock
	cfg.Backoff = func(int) time.Duration { return time.Hour }
	c := start(t, cfg)
	c.connected(t)

	require.NoError(t, srv.Disconnect("gw-clock"))
	select {
	case d := <-clock.armed:
		assert.Equal(t, time.Hour, d, "the backoff, waited on the clock")
	case <-time.After(10 * time.Second):
		t.Fatal("the reconnect did not wait on the clock")
	}
	assert.False(t, c.State().Connected)
	assert.Equal(t, time.Hour, c.State().Retry)
	assert.Equal(t, 1, srv.Stats().Connections, "no reconnect before the backoff has passed")

	clock.set(start0.Add(time.Hour))
	ctx := testContext(t)
	require.NoError(t, srv.Await(ctx, func() bool { return srv.Stats().Connections == 2 && srv.Connected("gw-clock") }))
	c.connected(t)
}

// A request on a session that has ended fails at once: no Run will make the connection it
// would wait for (the agent closes a session to reconnect with a renewed certificate).
func TestRequestAfterRunEnded(t *testing.T) {
	srv := hubtest.NewServer(t)
	ca := newDeviceCA(t)
	cfg := config(srv, "gw-ended", ca.softwareDevice(t, srv.Hub, "gw-ended"))
	cfg.RequestTimeout = time.Minute
	c := start(t, cfg)
	c.connected(t)
	c.stop(t)
	_, err := c.UpdateReported(testContext(t), json.RawMessage(`{"a":1}`))
	require.ErrorIs(t, err, hub.ErrClosed, "not ErrTimeout a minute later")
}

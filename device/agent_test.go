package device

import (
	"bytes"
	"context"
	"encoding/base64"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/unicity-iot/unicity/attest"
	"github.com/unicity-iot/unicity/attest/attesttest"
	"github.com/unicity-iot/unicity/config"
	"github.com/unicity-iot/unicity/internal/certcodec"
	"github.com/unicity-iot/unicity/internal/pki"
	"github.com/unicity-iot/unicity/storage"
)

// fakeClock is a manual clock: timers fire when Advance passes their deadline.
type fakeClock struct {
	mu      sync.Mutex
	now     time.Time
	waiters []fakeTimer
}

type fakeTimer struct {
	at time.Time
	ch chan time.Time
}

func newFakeClock(now time.Time) *fakeClock { return &fakeClock{now: now} }

func (c *fakeClock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.now
}

func (c *fakeClock) After(d time.Duration) <-chan time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	ch := make(chan time.Time, 1)
	if d <= 0 {
		ch <- c.now
		return ch
	}
	c.waiters = append(c.waiters, fakeTimer{at: c.now.Add(d), ch: ch})
	return ch
}

func (c *fakeClock) Advance(d time.Duration) { c.Set(c.Now().Add(d)) }

func (c *fakeClock) Set(t time.Time) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.now = t
	c.waiters = slices.DeleteFunc(c.waiters, func(w fakeTimer) bool {
		if w.at.After(t) {
			return false
		}
		w.ch <- t
		return true
	})
}

// hasTimerAt reports whether a timer is pending for exactly at.
func (c *fakeClock) hasTimerAt(at time.Time) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	return slices.ContainsFunc(c.waiters, func(w fakeTimer) bool { return w.at.Equal(at) })
}

// fakeDPS answers registrations from a script, then repeats the last answer.
type fakeDPS struct {
	mu     sync.Mutex
	script []func() (*storage.State, error)
	calls  int
}

func assigned(hub string) func() (*storage.State, error) {
	return func() (*storage.State, error) {
		return &storage.State{AssignedHub: hub, DeviceID: "gw-0001", Substatus: "initialAssignment", Transport: "mqtt"}, nil
	}
}

func failing(err error) func() (*storage.State, error) {
	return func() (*storage.State, error) { return nil, err }
}

func (f *fakeDPS) Register(ctx context.Context, id *Identity, prev *storage.State) (*storage.State, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	i := min(f.calls, len(f.script)-1)
	f.calls++
	return f.script[i]()
}

func (f *fakeDPS) Calls() int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.calls
}

// fakeHub accepts or refuses connections per hub name; sessions stay up until ended.
type fakeHub struct {
	mu       sync.Mutex
	refuse   map[string]error
	sessions []*fakeSession
	hubs     []string
	ids      []*Identity
}

type fakeSession struct {
	hub    string
	done   chan struct{}
	once   sync.Once
	err    error
	closed atomic.Bool
}

func (s *fakeSession) Done() <-chan struct{} { return s.done }
func (s *fakeSession) Err() error            { return s.err }
func (s *fakeSession) Close() error {
	s.closed.Store(true)
	s.end(errors.New("closed"))
	return nil
}
func (s *fakeSession) end(err error) {
	s.once.Do(func() {
		s.err = err
		close(s.done)
	})
}

func (h *fakeHub) Connect(ctx context.Context, id *Identity, st *storage.State) (Session, error) {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.hubs = append(h.hubs, st.AssignedHub)
	h.ids = append(h.ids, id)
	if err := h.refuse[st.AssignedHub]; err != nil {
		return nil, err
	}
	s := &fakeSession{hub: st.AssignedHub, done: make(chan struct{})}
	h.sessions = append(h.sessions, s)
	return s, nil
}

func (h *fakeHub) setRefusal(hub string, err error) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.refuse == nil {
		h.refuse = map[string]error{}
	}
	h.refuse[hub] = err
}

func (h *fakeHub) last() *fakeSession {
	h.mu.Lock()
	defer h.mu.Unlock()
	if len(h.sessions) == 0 {
		return nil
	}
	return h.sessions[len(h.sessions)-1]
}

func (h *fakeHub) attempts() []string {
	h.mu.Lock()
	defer h.mu.Unlock()
	return slices.Clone(h.hubs)
}

type recordingNotifier struct {
	mu    sync.Mutex
	lines []string
}

func (n *recordingNotifier) Notify(s string) {
	n.mu.Lock()
	defer n.mu.Unlock()
	n.lines = append(n.lines, s)
}

func (n *recordingNotifier) count(s string) int {
	n.mu.Lock()
	defer n.mu.Unlock()
	c := 0
	for _, l := range n.lines {
		if l == s {
			c++
		}
	}
	return c
}

// testbed is an agent over a software identity, fake DPS and hub, and a fake clock.
type testbed struct {
	t      *testing.T
	cfg    *config.Config
	leaf   *pki.Leaf
	clock  *fakeClock
	dps    *fakeDPS
	hub    *fakeHub
	notify *recordingNotifier
	agent  *Agent
	cancel context.CancelFunc
	done   chan error
}

func newTestbed(t *testing.T, dpsScript ...func() (*storage.State, error)) *testbed {
	t.Helper()
	dir := t.TempDir()
	ca, err := pki.NewRoot("Test Root")
	require.NoError(t, err)
	leaf, err := ca.NewDevice("gw-0001")
	require.NoError(t, err)
	certPath, keyPath := filepath.Join(dir, "identity.pem"), filepath.Join(dir, "identity.key")
	require.NoError(t, certcodec.WriteCertificates(certPath, leaf.Chain...))
	require.NoError(t, certcodec.WritePrivateKey(keyPath, leaf.Key))

	cfg, err := config.Parse("test.toml", fmt.Appendf(nil, `
[provisioning]
id_scope = "0ne00000000"
[attestation]
identity_cert = %q
identity_key = "file:%s"
[state]
dir = %q
[runtime]
dir = %q
`, certPath, keyPath, filepath.Join(dir, "state"), filepath.Join(dir, "run")))
	require.NoError(t, err)

	if len(dpsScript) == 0 {
		dpsScript = append(dpsScript, assigned("hub-a.example"))
	}
	tb := &testbed{
		t: t, cfg: cfg, leaf: leaf,
		clock:  newFakeClock(time.Now()),
		dps:    &fakeDPS{script: dpsScript},
		hub:    &fakeHub{},
		notify: &recordingNotifier{},
	}
	tb.agent = tb.newAgent()
	return tb
}

func (tb *testbed) newAgent() *Agent {
	return &Agent{
		Config:      tb.cfg,
		Store:       storage.New(tb.cfg.State.Dir),
		Provisioner: tb.dps,
		Hub:         tb.hub,
		Clock:       tb.clock,
		Notifier:    tb.notify,
		Backoff:     func(attempt int) time.Duration { return time.Duration(attempt) * time.Second },
	}
}

// listenAPI gives the agent its local API socket.
func (tb *testbed) listenAPI() {
	ln, err := ListenAPI(tb.cfg)
	require.NoError(tb.t, err)
	tb.agent.API = ln
}

func (tb *testbed) start() {
	ctx, cancel := context.WithCancel(context.Background())
	tb.cancel = cancel
	tb.done = make(chan error, 1)
	go func() { tb.done <- tb.agent.Run(ctx) }()
	tb.t.Cleanup(func() {
		if tb.cancel != nil {
			tb.stop()
		}
	})
}

// stop cancels the agent and requires it to return within 5 s.
func (tb *testbed) stop() error {
	tb.cancel()
	tb.cancel = nil
	select {
	case err := <-tb.done:
		return err
	case <-time.After(5 * time.Second):
		tb.t.Fatal("the agent did not stop within 5 s of cancellation")
		return nil
	}
}

func (tb *testbed) waitPhase(p Phase) Status {
	tb.t.Helper()
	var s Status
	require.Eventually(tb.t, func() bool {
		s = tb.agent.Status()
		return s.Phase == p
	}, 5*time.Second, time.Millisecond, "waiting for phase %s; status is %+v", p, tb.agent.Status())
	return s
}

// waitRetry waits until the agent sleeps until its announced next retry, and returns it.
func (tb *testbed) waitRetry(p Phase) Status {
	tb.t.Helper()
	var s Status
	require.Eventually(tb.t, func() bool {
		s = tb.agent.Status()
		return s.Phase == p && !s.NextRetry.IsZero() && tb.clock.hasTimerAt(s.NextRetry)
	}, 5*time.Second, time.Millisecond, "waiting for a retry in phase %s; status is %+v", p, tb.agent.Status())
	return s
}

func (tb *testbed) saveState(st *storage.State) {
	l, err := storage.New(tb.cfg.State.Dir).TryLock()
	require.NoError(tb.t, err)
	defer l.Unlock()
	require.NoError(tb.t, l.Save(st))
}

func (tb *testbed) loadState() *storage.State {
	st, err := storage.New(tb.cfg.State.Dir).Load()
	require.NoError(tb.t, err)
	return st
}

func TestFirstBootProvisionsAndConnects(t *testing.T) {
	tb := newTestbed(t)
	tb.start()
	s := tb.waitPhase(PhaseConnected)
	assert.Equal(t, "hub-a.example", s.AssignedHub)
	assert.Equal(t, "gw-0001", s.RegistrationID)
	assert.Equal(t, 1, tb.dps.Calls())
	assert.Equal(t, 1, tb.notify.count("READY=1"))

	st := tb.loadState()
	assert.True(t, st.BelongsTo("gw-0001", certcodec.Thumbprint(tb.leaf.Certificate())))
	assert.Equal(t, "hub-a.example", st.AssignedHub)
	assert.Equal(t, 1, st.Attempts)

	require.Eventually(t, func() bool {
		onDisk, err := ReadStatus(tb.cfg.Runtime.Dir)
		return err == nil && onDisk.Phase == PhaseConnected
	}, 5*time.Second, time.Millisecond, "status file")

	require.NoError(t, tb.stop())
	assert.Equal(t, 1, tb.notify.count("STOPPING=1"))
	assert.True(t, tb.hub.last().closed.Load(), "the session is closed on stop")
	onDisk, err := ReadStatus(tb.cfg.Runtime.Dir)
	require.NoError(t, err)
	assert.Equal(t, PhaseStopped, onDisk.Phase)
}

func TestSecondBootUsesStoredAssignment(t *testing.T) {
	tb := newTestbed(t)
	tb.saveState(&storage.State{
		RegistrationID: "GW-0001", CertSHA256: certcodec.Thumbprint(tb.leaf.Certificate()),
		AssignedHub: "hub-b.example", DeviceID: "gw-0001", ProvisionedAt: tb.clock.Now().Add(-time.Hour),
	})
	tb.start()
	s := tb.waitPhase(PhaseConnected)
	assert.Equal(t, "hub-b.example", s.AssignedHub)
	assert.Zero(t, tb.dps.Calls(), "no DPS traffic when the state is valid")
}

func TestStateNotUsableRegistersAgain(t *testing.T) {
	tests := []struct {
		name  string
		setup func(tb *testbed)
		note  string
	}{
		{"another certificate", func(tb *testbed) {
			tb.saveState(&storage.State{RegistrationID: "gw-0001", CertSHA256: strings.Repeat("AB", 32), AssignedHub: "hub-old", DeviceID: "gw-0001"})
		}, "another identity"},
		{"another device (cloned image)", func(tb *testbed) {
			tb.saveState(&storage.State{RegistrationID: "gw-0002", CertSHA256: certcodec.Thumbprint(tb.leaf.Certificate()), AssignedHub: "hub-old", DeviceID: "gw-0002"})
		}, "another identity"},
		{"corrupt", func(tb *testbed) {
			require.NoError(t, os.MkdirAll(tb.cfg.State.Dir, 0o700))
			require.NoError(t, os.WriteFile(filepath.Join(tb.cfg.State.Dir, storage.FileName), []byte("{garbage"), 0o600))
		}, "corrupt"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			tb := newTestbed(t)
			tt.setup(tb)
			tb.start()
			s := tb.waitPhase(PhaseConnected)
			assert.Equal(t, "hub-a.example", s.AssignedHub)
			assert.Equal(t, 1, tb.dps.Calls())
			assert.Contains(t, s.LastError, tt.note)
			assert.Equal(t, "hub-a.example", tb.loadState().AssignedHub)
		})
	}
}

func TestProvisioningRetriesWithBackoffAndRetryAfter(t *testing.T) {
	unreachable := Mark(errors.New("dial tcp: connection refused"), ErrUnreachable)
	throttled := &RetryAfterError{After: 40 * time.Second, Err: Mark(errors.New("throttled by DPS"), ErrTemporary)}
	tb := newTestbed(t, failing(unreachable), failing(throttled), assigned("hub-a.example"))
	tb.start()

	s := tb.waitRetry(PhaseProvisioning)
	assert.Equal(t, 1, tb.dps.Calls())
	assert.Equal(t, time.Second, s.NextRetry.Sub(s.LastErrorAt), "first backoff")
	assert.Contains(t, s.LastError, "connection refused")
	assert.Contains(t, s.Message, "retrying in")
	tb.clock.Advance(time.Second)

	s = tb.waitRetry(PhaseProvisioning)
	assert.Equal(t, 2, tb.dps.Calls())
	assert.Equal(t, 40*time.Second, s.NextRetry.Sub(s.LastErrorAt), "retry-after wins over a shorter backoff")
	tb.clock.Advance(39 * time.Second)
	assert.Never(t, func() bool { return tb.dps.Calls() > 2 }, 50*time.Millisecond, time.Millisecond, "retried before retry-after")
	tb.clock.Advance(time.Second)

	tb.waitPhase(PhaseConnected)
	assert.Equal(t, 3, tb.dps.Calls())
	assert.Equal(t, 3, tb.loadState().Attempts)
}

func TestRefusalParksWithoutHammering(t *testing.T) {
	refused := Mark(errors.New("enrollment disabled"), ErrRefused)
	tb := newTestbed(t, failing(refused), assigned("hub-a.example"))
	tb.start()

	s := tb.waitRetry(PhaseParked)
	assert.Equal(t, time.Hour, s.NextRetry.Sub(tb.clock.Now()))
	assert.Contains(t, s.Message, "enrollment disabled")
	assert.Equal(t, 1, tb.notify.count("READY=1"), "parked is ready, with the reason in STATUS=")
	tb.clock.Advance(59 * time.Minute)
	assert.Never(t, func() bool { return tb.dps.Calls() > 1 }, 50*time.Millisecond, time.Millisecond)

	tb.clock.Advance(time.Minute)
	tb.waitPhase(PhaseConnected)
	assert.Equal(t, 2, tb.dps.Calls())
	assert.Equal(t, 1, tb.notify.count("READY=1"), "READY=1 is sent once")
}

func TestWaitsForValidClock(t *testing.T) {
	tb := newTestbed(t)
	real := tb.clock.Now()
	tb.clock.Set(time.Unix(0, 0))
	tb.start()
	s := tb.waitPhase(PhaseWaitingClock)
	assert.Contains(t, s.Message, "1970-01-01")
	assert.Zero(t, tb.dps.Calls())
	require.Eventually(t, func() bool { return tb.clock.hasTimerAt(time.Unix(0, 0).Add(clockPoll)) }, 5*time.Second, time.Millisecond)
	tb.clock.Set(real)
	tb.waitPhase(PhaseConnected)
	assert.Equal(t, 1, tb.dps.Calls())
}

func TestFirstBootDelaySpreadsRegistrations(t *testing.T) {
	tb := newTestbed(t)
	tb.cfg.Agent.FirstBootDelay = 10 * time.Minute
	tb.start()
	s := tb.waitRetry(PhaseProvisioning)
	assert.Contains(t, s.Message, "first boot")
	assert.LessOrEqual(t, s.NextRetry.Sub(tb.clock.Now()), 10*time.Minute)
	tb.clock.Advance(10 * time.Minute)
	tb.waitPhase(PhaseConnected)
	assert.Equal(t, 1, tb.dps.Calls())
}

func TestHubRefusingIdentityReprovisionsRateLimited(t *testing.T) {
	tb := newTestbed(t, assigned("hub-b.example"))
	provisioned := tb.clock.Now().Add(-time.Minute)
	tb.saveState(&storage.State{
		RegistrationID: "gw-0001", CertSHA256: certcodec.Thumbprint(tb.leaf.Certificate()),
		AssignedHub: "hub-a.example", DeviceID: "gw-0001", ProvisionedAt: provisioned,
	})
	tb.hub.setRefusal("hub-a.example", Mark(errors.New("CONNACK 5"), ErrIdentityRejected))
	tb.start()

	s := tb.waitRetry(PhaseProvisioning)
	assert.Equal(t, provisioned.Add(tb.cfg.Agent.ReprovisionInterval), s.NextRetry, "rate limit since the last registration")
	assert.Contains(t, s.Message, "refused the identity")
	assert.Zero(t, tb.dps.Calls())
	assert.Equal(t, "hub-a.example", tb.loadState().AssignedHub, "the old assignment stays until a new one is stored")

	tb.clock.Set(s.NextRetry)
	s = tb.waitPhase(PhaseConnected)
	assert.Equal(t, "hub-b.example", s.AssignedHub)
	assert.Equal(t, 1, tb.dps.Calls())
	assert.Equal(t, "hub-b.example", tb.loadState().AssignedHub)
}

func TestUnreachableHubSendsBackToDPS(t *testing.T) {
	tb := newTestbed(t, assigned("hub-a.example"), assigned("hub-b.example"))
	tb.cfg.Agent.HubFailures = 3
	tb.cfg.Agent.ReprovisionInterval = 0
	tb.hub.setRefusal("hub-a.example", Mark(errors.New("connection refused"), ErrUnreachable))
	tb.start()

	for range 2 {
		tb.waitRetry(PhaseConnecting)
		tb.clock.Advance(time.Minute)
	}
	s := tb.waitPhase(PhaseConnected)
	assert.Equal(t, "hub-b.example", s.AssignedHub)
	assert.Equal(t, 2, tb.dps.Calls())
	assert.Equal(t, []string{"hub-a.example", "hub-a.example", "hub-a.example", "hub-b.example"}, tb.hub.attempts())
}

func TestLostSessionReconnects(t *testing.T) {
	tb := newTestbed(t)
	tb.start()
	tb.waitPhase(PhaseConnected)
	first := tb.hub.last()
	first.end(Mark(errors.New("connection reset"), ErrUnreachable))
	tb.waitRetry(PhaseConnecting)
	tb.clock.Advance(time.Second)
	tb.waitPhase(PhaseConnected)
	assert.NotSame(t, first, tb.hub.last())
	assert.Equal(t, 1, tb.dps.Calls())
}

func TestIdentityErrorsStopTheAgent(t *testing.T) {
	tb := newTestbed(t)
	tb.agent.Credentials = func(context.Context, *config.Config) (*Credentials, error) {
		return nil, classifyIdentityError(fmt.Errorf("%w: certificate for another key", attest.ErrKeyMismatch))
	}
	tb.start()
	select {
	case err := <-tb.done:
		require.ErrorIs(t, err, ErrIdentity)
		tb.cancel = nil
	case <-time.After(5 * time.Second):
		t.Fatal("the agent kept running with an unusable identity")
	}
}

func TestTPMNotReadyIsRetried(t *testing.T) {
	tb := newTestbed(t)
	calls := 0
	tb.agent.Credentials = func(ctx context.Context, cfg *config.Config) (*Credentials, error) {
		calls++
		if calls == 1 {
			return nil, classifyIdentityError(fmt.Errorf("%w at swtpm:127.0.0.1:1: connection refused", attest.ErrNoTPM))
		}
		return OpenCredentials(ctx, cfg)
	}
	tb.start()
	s := tb.waitRetry(PhaseWaitingTPM)
	assert.Contains(t, s.Message, "waiting for the TPM: ")
	tb.clock.Advance(time.Second)
	tb.waitPhase(PhaseConnected)
}

// TestTPMThatDoesNotAnswerYet: while loading the identity waits on the TPM (each command
// within its deadline), the status says so, the watchdog keeps being fed, and a stop cuts
// the wait short.
func TestTPMThatDoesNotAnswerYet(t *testing.T) {
	tb := newTestbed(t)
	tb.agent.Watchdog = 20 * time.Millisecond
	tb.agent.Credentials = func(ctx context.Context, _ *config.Config) (*Credentials, error) {
		<-ctx.Done() // a wedged TPM under attest's deadline-less fake
		return nil, fmt.Errorf("%w: command interrupted: %w", attest.ErrTPMUnavailable, ctx.Err())
	}
	tb.start()
	s := tb.waitPhase(PhaseLoading)
	assert.Equal(t, "loading the device identity", s.Message)
	pings := tb.notify.count("WATCHDOG=1")
	require.Eventually(t, func() bool { return tb.notify.count("WATCHDOG=1") >= pings+3 }, 5*time.Second, time.Millisecond,
		"a bounded wait on the TPM does not get the agent killed by the watchdog")
	require.NoError(t, tb.stop(), "stopped within 5 s, by the end of its context")
}

// TestTPMThatDoesNotExistYet: the TPM's socket (a device node, when its driver loads late)
// is not there when the agent starts. It waits in waiting_for_tpm, looking again every
// tpmDevicePoll, and loads the identity once the TPM appears: not an exit 78 that systemd
// would never restart.
func TestTPMThatDoesNotExistYet(t *testing.T) {
	p := attesttest.SWTPMProcess(t)
	spec := "swtpm:" + p.Addr
	tpm, err := attest.OpenTPM(context.Background(), spec)
	require.NoError(t, err)
	kf, err := attest.CreateKey(tpm, attest.ECDSAP256)
	require.NoError(t, err)
	require.NoError(t, tpm.Close())
	keyPath := filepath.Join(t.TempDir(), "identity.key")
	require.NoError(t, attest.WriteKeyfile(keyPath, kf))
	pub, err := kf.PublicKey()
	require.NoError(t, err)
	ca, err := pki.NewRoot("Test Root")
	require.NoError(t, err)
	leaf, err := ca.IssueDevice("gw-0001", pub)
	require.NoError(t, err)
	certPath := filepath.Join(t.TempDir(), "identity.pem")
	require.NoError(t, certcodec.WriteCertificates(certPath, leaf.Chain...))
	p.Stop()
	require.NoError(t, os.Remove(p.Addr))

	tb := newTestbed(t)
	tb.cfg.Attestation.IdentityKey, tb.cfg.Attestation.IdentityCert, tb.cfg.TPM.Device = "tpmkey:"+keyPath, certPath, spec
	tb.start()
	s := tb.waitRetry(PhaseWaitingTPM)
	assert.Contains(t, s.Message, "waiting for the TPM to appear: no TPM at "+spec)
	assert.Equal(t, tpmDevicePoll, s.NextRetry.Sub(tb.clock.Now()), "a slow, steady look")
	tb.clock.Advance(tpmDevicePoll)
	tb.waitRetry(PhaseWaitingTPM)

	require.NoError(t, p.Restart())
	tb.clock.Advance(tpmDevicePoll)
	tb.waitPhase(PhaseConnected)
}

func TestReprovisionThroughTheLocalAPI(t *testing.T) {
	tb := newTestbed(t, assigned("hub-a.example"), assigned("hub-b.example"))
	tb.listenAPI()
	tb.start()
	tb.waitPhase(PhaseConnected)
	first := tb.hub.last()

	c := NewClient(tb.cfg)
	ctx := context.Background()
	_, err := c.Reprovision(ctx, false, false, nil)
	require.ErrorIs(t, err, ErrTemporary, "rate limited without --force")
	assert.Contains(t, err.Error(), "--force")
	assert.Equal(t, 1, tb.dps.Calls())

	asg, err := c.Reprovision(ctx, false, true, nil)
	require.NoError(t, err, "provision-only answers with the assignment in force")
	assert.Equal(t, "hub-a.example", asg.AssignedHub)

	var seen []Phase
	asg, err = c.Reprovision(ctx, true, false, func(s Status) { seen = append(seen, s.Phase) })
	require.NoError(t, err)
	assert.Equal(t, "hub-b.example", asg.AssignedHub)
	assert.NotEmpty(t, seen, "progress is streamed")
	require.Eventually(t, func() bool { return tb.hub.last() != first && tb.agent.Status().Phase == PhaseConnected }, 5*time.Second, time.Millisecond)
	assert.Equal(t, "hub-b.example", tb.agent.Status().AssignedHub)
	assert.True(t, first.closed.Load(), "the old session is closed once the new assignment is stored")

	got, err := c.Status(ctx)
	require.NoError(t, err)
	assert.Equal(t, PhaseConnected, got.Phase)

	require.NoError(t, tb.stop())
	_, err = c.Status(ctx)
	require.ErrorIs(t, err, ErrNotRunning)
}

// postReprovision posts to the agent's /v1/reprovision over its socket.
func postReprovision(t *testing.T, cfg *config.Config, query string) (*http.Response, string) {
	t.Helper()
	c := http.Client{Transport: &http.Transport{DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
		var d net.Dialer
		return d.DialContext(ctx, "unix", APISocket(cfg))
	}}, Timeout: 10 * time.Second}
	resp, err := c.Post("http://unicity/v1/reprovision"+query, "", nil)
	require.NoError(t, err)
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	require.NoError(t, err)
	return resp, string(body)
}

// TestReprovisionAPIStatuses: an answer the agent gives before it registers comes whole with
// its HTTP status (429 and Retry-After when rate-limited, 400 for a bad parameter, 503 while
// it cannot register); a registration under way is 200 with its progress streamed.
func TestReprovisionAPIStatuses(t *testing.T) {
	tb := newTestbed(t, assigned("hub-a.example"), assigned("hub-b.example"))
	tb.listenAPI()
	tb.start()
	tb.waitPhase(PhaseConnected)

	resp, body := postReprovision(t, tb.cfg, "")
	assert.Equal(t, http.StatusTooManyRequests, resp.StatusCode, body)
	assert.Equal(t, "application/json", resp.Header.Get("Content-Type"))
	retry, err := strconv.Atoi(resp.Header.Get("Retry-After"))
	require.NoError(t, err, "Retry-After: %q", resp.Header.Get("Retry-After"))
	assert.InDelta(t, tb.cfg.Agent.ReprovisionInterval.Seconds(), retry, 2)
	assert.Contains(t, body, `"error":"registered too recently: `)
	assert.Contains(t, body, `"kind":"temporary"`)

	resp, body = postReprovision(t, tb.cfg, "?force=yes")
	assert.Equal(t, http.StatusBadRequest, resp.StatusCode, body)
	assert.Contains(t, body, `"error":"force: want 1 or 0, not \"yes\""`)
	assert.Equal(t, 1, tb.dps.Calls(), "no registration for refused requests")

	resp, body = postReprovision(t, tb.cfg, "?force=1")
	assert.Equal(t, http.StatusOK, resp.StatusCode, body)
	assert.Equal(t, "application/x-ndjson", resp.Header.Get("Content-Type"))
	lines := strings.Split(strings.TrimSpace(body), "\n")
	assert.Contains(t, lines[0], `"status":`, "progress first")
	assert.Contains(t, lines[len(lines)-1], `"assignment":{"registration_id":"gw-0001","assigned_hub":"hub-b.example"`)
	require.NoError(t, tb.stop())

	// Waiting for a valid clock, the agent cannot register: 503, at once.
	tb = newTestbed(t)
	tb.clock.Set(time.Unix(0, 0))
	tb.listenAPI()
	tb.start()
	tb.waitPhase(PhaseWaitingClock)
	resp, body = postReprovision(t, tb.cfg, "?force=1")
	assert.Equal(t, http.StatusServiceUnavailable, resp.StatusCode, body)
	assert.Contains(t, body, `"error":"the agent is waiting for a valid clock","kind":"temporary"`)
}

func TestParkedAgentRegistersOnRequest(t *testing.T) {
	refused := Mark(errors.New("no enrollment"), ErrRefused)
	tb := newTestbed(t, failing(refused), assigned("hub-a.example"))
	tb.listenAPI()
	tb.start()
	tb.waitPhase(PhaseParked)
	asg, err := NewClient(tb.cfg).Reprovision(context.Background(), false, false, nil)
	require.NoError(t, err)
	assert.Equal(t, "hub-a.example", asg.AssignedHub)
	tb.waitPhase(PhaseConnected)
}

func TestWatchdogPingsWhileLoopIsAlive(t *testing.T) {
	tb := newTestbed(t)
	tb.agent.Watchdog = 20 * time.Millisecond
	real := tb.clock.Now()
	tb.clock.Set(time.Unix(0, 0))
	tb.start()

	tb.waitPhase(PhaseWaitingClock)
	require.Eventually(t, func() bool { return tb.notify.count("EXTEND_TIMEOUT_USEC=20000") >= 2 }, 5*time.Second, time.Millisecond,
		"a healthy agent that is not ready yet extends the start timeout")
	require.Eventually(t, func() bool { return tb.clock.hasTimerAt(time.Unix(0, 0).Add(clockPoll)) }, 5*time.Second, time.Millisecond)
	tb.clock.Set(real)

	tb.waitPhase(PhaseConnected)
	extended := tb.notify.count("EXTEND_TIMEOUT_USEC=20000")
	pings := tb.notify.count("WATCHDOG=1")
	require.Eventually(t, func() bool { return tb.notify.count("WATCHDOG=1") >= pings+3 }, 5*time.Second, time.Millisecond)
	assert.LessOrEqual(t, tb.notify.count("EXTEND_TIMEOUT_USEC=20000"), extended+1, "no extension once ready")
}

func TestStaleSessionGoesBackToDPS(t *testing.T) {
	tb := newTestbed(t, assigned("hub-a.example"), assigned("hub-b.example"))
	tb.cfg.Agent.ReprovisionInterval = 0
	tb.start()
	tb.waitPhase(PhaseConnected)
	first := tb.hub.last()
	first.end(Mark(errors.New("hub unreachable, giving up after 10 attempts"), ErrStale))
	require.Eventually(t, func() bool {
		s := tb.agent.Status()
		return tb.hub.last() != first && s.Phase == PhaseConnected && s.AssignedHub == "hub-b.example"
	}, 5*time.Second, time.Millisecond)
	assert.Equal(t, 2, tb.dps.Calls(), "a session that gave up counts as hub_failures failures: straight back to DPS")
	assert.Equal(t, []string{"hub-a.example", "hub-b.example"}, tb.hub.attempts(), "no retry of the stale hub first")
}

func TestWatchdogStopsWhenTheLoopIsStuck(t *testing.T) {
	tb := newTestbed(t)
	tb.agent.Watchdog = 20 * time.Millisecond
	release := make(chan struct{})
	var once sync.Once
	tb.agent.OnStatus = func(s Status) {
		if s.Phase == PhaseConnected {
			once.Do(func() { <-release }) // the loop hangs where no bounded call covers it
		}
	}
	tb.start()
	require.Eventually(t, func() bool { return tb.hub.last() != nil }, 5*time.Second, time.Millisecond)
	// A ping answered before the loop hung may still go out: wait until none has for three
	// watchdog periods.
	stuck := tb.notify.count("WATCHDOG=1")
	require.Eventually(t, func() bool {
		n := tb.notify.count("WATCHDOG=1")
		stopped := n == stuck
		stuck = n
		return stopped
	}, 5*time.Second, 3*tb.agent.Watchdog)
	assert.Never(t, func() bool { return tb.notify.count("WATCHDOG=1") > stuck }, 200*time.Millisecond, 5*time.Millisecond,
		"no WATCHDOG=1 while the loop is stuck")
	close(release)
	require.Eventually(t, func() bool { return tb.notify.count("WATCHDOG=1") > stuck }, 5*time.Second, time.Millisecond,
		"pings resume with the loop")
}

// A symmetric-key device: the key reaches the hub, the state is bound to a digest of it, and a
// new key (rotated in the enrollment and installed) makes the agent register again.
func TestSymmetricKeyDevice(t *testing.T) {
	tb := newTestbed(t)
	key, rotated := bytes.Repeat([]byte{9}, 32), bytes.Repeat([]byte{10}, 32)
	path := writeKeyFile(t, base64.StdEncoding.EncodeToString(key), 0o600)
	tb.cfg.Attestation = config.Attestation{Method: "symmetric_key", SymmetricKey: path}
	tb.cfg.Provisioning.RegistrationID = "gw-0001"

	tb.start()
	tb.waitPhase(PhaseConnected)
	require.NoError(t, tb.stop())
	st := tb.loadState()
	assert.Equal(t, SymmetricKeyBinding(key), st.CertSHA256)
	tb.hub.mu.Lock()
	assert.Equal(t, key, tb.hub.ids[0].SymmetricKey)
	assert.Nil(t, tb.hub.ids[0].X509)
	tb.hub.mu.Unlock()
	assert.Equal(t, 1, tb.dps.Calls())

	require.NoError(t, os.WriteFile(path, []byte(base64.StdEncoding.EncodeToString(rotated)), 0o600))
	tb.agent = tb.newAgent()
	tb.start()
	tb.waitPhase(PhaseConnected)
	assert.Equal(t, 2, tb.dps.Calls(), "the state belonged to the old key")
	assert.Equal(t, SymmetricKeyBinding(rotated), tb.loadState().CertSHA256)
	assert.Contains(t, tb.agent.Status().LastError, "belongs to another identity")
	for _, form := range []string{base64.StdEncoding.EncodeToString(key), base64.StdEncoding.EncodeToString(rotated)} {
		assert.NotContains(t, fmt.Sprintf("%+v", tb.agent.Status()), form)
	}
}

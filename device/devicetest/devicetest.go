// Package devicetest is test-only: the agent over a software identity, a scripted DPS, a fake
// hub and a manual clock (Testbed), for the tests of device and of the packages that serve
// beside it (localapi, gateway).
package devicetest

import (
	"context"
	"errors"
	"fmt"
	"path/filepath"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/unicity-iot/unicity/config"
	"github.com/unicity-iot/unicity/device"
	"github.com/unicity-iot/unicity/internal/certcodec"
	"github.com/unicity-iot/unicity/internal/pki"
	"github.com/unicity-iot/unicity/storage"
)

// Clock is a manual clock: timers fire when Advance or Set passes their deadline.
type Clock struct {
	mu      sync.Mutex
	now     time.Time
	waiters []timer
}

type timer struct {
	at time.Time
	ch chan time.Time
}

// NewClock returns a clock that says now until moved.
func NewClock(now time.Time) *Clock { return &Clock{now: now} }

func (c *Clock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.now
}

func (c *Clock) After(d time.Duration) <-chan time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	ch := make(chan time.Time, 1)
	if d <= 0 {
		ch <- c.now
		return ch
	}
	c.waiters = append(c.waiters, timer{at: c.now.Add(d), ch: ch})
	return ch
}

// Advance moves the clock on by d.
func (c *Clock) Advance(d time.Duration) { c.Set(c.Now().Add(d)) }

// Set moves the clock to t, firing the timers due by then.
func (c *Clock) Set(t time.Time) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.now = t
	c.waiters = slices.DeleteFunc(c.waiters, func(w timer) bool {
		if w.at.After(t) {
			return false
		}
		w.ch <- t
		return true
	})
}

// HasTimerAt reports whether a timer is pending for exactly at.
func (c *Clock) HasTimerAt(at time.Time) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	return slices.ContainsFunc(c.waiters, func(w timer) bool { return w.at.Equal(at) })
}

// DPS answers registrations from a script, then repeats the last answer.
type DPS struct {
	mu     sync.Mutex
	script []func() (*storage.State, error)
	calls  int
}

// Assigned is a DPS answer assigning device gw-0001 to hub.
func Assigned(hub string) func() (*storage.State, error) {
	return func() (*storage.State, error) {
		return &storage.State{AssignedHub: hub, DeviceID: "gw-0001", Substatus: "initialAssignment", Transport: "mqtt"}, nil
	}
}

// Failing is a DPS answer failing with err.
func Failing(err error) func() (*storage.State, error) {
	return func() (*storage.State, error) { return nil, err }
}

func (f *DPS) Register(ctx context.Context, id *device.Identity, prev *storage.State) (*storage.State, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	i := min(f.calls, len(f.script)-1)
	f.calls++
	return f.script[i]()
}

// Calls counts the registrations made.
func (f *DPS) Calls() int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.calls
}

// Hub accepts or refuses connections per hub name; sessions stay up until ended.
type Hub struct {
	mu       sync.Mutex
	refuse   map[string]error
	sessions []*Session
	hubs     []string
	ids      []*device.Identity
}

// Session is one of Hub's sessions.
type Session struct {
	hub  string
	done chan struct{}
	once sync.Once
	err  error
	// Closed is set once the agent closed the session.
	Closed atomic.Bool
}

func (s *Session) Done() <-chan struct{} { return s.done }
func (s *Session) Err() error            { return s.err }
func (s *Session) Close() error {
	s.Closed.Store(true)
	s.End(errors.New("closed"))
	return nil
}

// End ends the session with err, as a lost connection does.
func (s *Session) End(err error) {
	s.once.Do(func() {
		s.err = err
		close(s.done)
	})
}

func (h *Hub) Connect(ctx context.Context, id *device.Identity, st *storage.State) (device.Session, error) {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.hubs = append(h.hubs, st.AssignedHub)
	h.ids = append(h.ids, id)
	if err := h.refuse[st.AssignedHub]; err != nil {
		return nil, err
	}
	s := &Session{hub: st.AssignedHub, done: make(chan struct{})}
	h.sessions = append(h.sessions, s)
	return s, nil
}

// SetRefusal makes connections to hub fail with err (nil accepts them again).
func (h *Hub) SetRefusal(hub string, err error) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.refuse == nil {
		h.refuse = map[string]error{}
	}
	h.refuse[hub] = err
}

// Last is the latest session, or nil.
func (h *Hub) Last() *Session {
	h.mu.Lock()
	defer h.mu.Unlock()
	if len(h.sessions) == 0 {
		return nil
	}
	return h.sessions[len(h.sessions)-1]
}

// Attempts are the hubs connected to, in order, refused or not.
func (h *Hub) Attempts() []string {
	h.mu.Lock()
	defer h.mu.Unlock()
	return slices.Clone(h.hubs)
}

// IDs are the identities connected with, in order.
func (h *Hub) IDs() []*device.Identity {
	h.mu.Lock()
	defer h.mu.Unlock()
	return slices.Clone(h.ids)
}

// Notifier records the lines sent to the service manager.
type Notifier struct {
	mu    sync.Mutex
	lines []string
}

func (n *Notifier) Notify(s string) {
	n.mu.Lock()
	defer n.mu.Unlock()
	n.lines = append(n.lines, s)
}

// Count is how many times s was sent.
func (n *Notifier) Count(s string) int {
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

// Testbed is an agent over a software identity, a scripted DPS, a fake hub and a manual
// clock.
type Testbed struct {
	T      *testing.T
	Config *config.Config
	Leaf   *pki.Leaf
	Clock  *Clock
	DPS    *DPS
	Hub    *Hub
	Notify *Notifier
	Agent  *device.Agent

	cancel context.CancelFunc
	done   chan error
}

// New returns a testbed whose DPS answers from dpsScript (by default: Assigned("hub-a.example")).
func New(t *testing.T, dpsScript ...func() (*storage.State, error)) *Testbed {
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
		dpsScript = append(dpsScript, Assigned("hub-a.example"))
	}
	tb := &Testbed{
		T: t, Config: cfg, Leaf: leaf,
		Clock:  NewClock(time.Now()),
		DPS:    &DPS{script: dpsScript},
		Hub:    &Hub{},
		Notify: &Notifier{},
	}
	tb.Agent = tb.NewAgent()
	return tb
}

// NewAgent is a fresh agent on the testbed's configuration, state, fakes and clock.
func (tb *Testbed) NewAgent() *device.Agent {
	return &device.Agent{
		Config:      tb.Config,
		Store:       storage.New(tb.Config.State.Dir),
		Provisioner: tb.DPS,
		Hub:         tb.Hub,
		Clock:       tb.Clock,
		Notifier:    tb.Notify,
		Backoff:     func(attempt int) time.Duration { return time.Duration(attempt) * time.Second },
	}
}

// Start runs the agent until Stop or the end of the test.
func (tb *Testbed) Start() {
	ctx, cancel := context.WithCancel(context.Background())
	tb.cancel = cancel
	tb.done = make(chan error, 1)
	go func() { tb.done <- tb.Agent.Run(ctx) }()
	tb.T.Cleanup(func() {
		if tb.cancel != nil {
			tb.Stop()
		}
	})
}

// Stop cancels the agent and requires it to return within 5 s.
func (tb *Testbed) Stop() error {
	tb.cancel()
	tb.cancel = nil
	select {
	case err := <-tb.done:
		return err
	case <-time.After(5 * time.Second):
		tb.T.Fatal("the agent did not stop within 5 s of cancellation")
		return nil
	}
}

// WaitPhase waits until the agent is in phase p, and returns its status.
func (tb *Testbed) WaitPhase(p device.Phase) device.Status {
	tb.T.Helper()
	var s device.Status
	require.Eventually(tb.T, func() bool {
		s = tb.Agent.Status()
		return s.Phase == p
	}, 5*time.Second, time.Millisecond, "waiting for phase %s; status is %+v", p, tb.Agent.Status())
	return s
}

// WaitRetry waits until the agent sleeps until its announced next retry, and returns it.
func (tb *Testbed) WaitRetry(p device.Phase) device.Status {
	tb.T.Helper()
	var s device.Status
	require.Eventually(tb.T, func() bool {
		s = tb.Agent.Status()
		return s.Phase == p && !s.NextRetry.IsZero() && tb.Clock.HasTimerAt(s.NextRetry)
	}, 5*time.Second, time.Millisecond, "waiting for a retry in phase %s; status is %+v", p, tb.Agent.Status())
	return s
}

// SaveState stores st as the agent's state.
func (tb *Testbed) SaveState(st *storage.State) {
	l, err := storage.New(tb.Config.State.Dir).TryLock()
	require.NoError(tb.T, err)
	defer l.Unlock()
	require.NoError(tb.T, l.Save(st))
}

// LoadState reads the agent's stored state.
func (tb *Testbed) LoadState() *storage.State {
	st, err := storage.New(tb.Config.State.Dir).Load()
	require.NoError(tb.T, err)
	return st
}

// Returned waits up to 5 s for Run to return by itself, and returns its error; ok is false
// when it kept running.
func (tb *Testbed) Returned() (err error, ok bool) {
	select {
	case err := <-tb.done:
		tb.cancel = nil
		return err, true
	case <-time.After(5 * time.Second):
		return nil, false
	}
}

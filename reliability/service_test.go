package reliability_test

import (
	"context"
	"fmt"
	"os"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/unicity-iot/unicity/device"
	"github.com/unicity-iot/unicity/dps"
	"github.com/unicity-iot/unicity/dps/dpstest"
	"github.com/unicity-iot/unicity/internal/dial"
)

// TestEmulatorRestart kills and restarts the emulator process while the real agent is
// registering (DPS forgets operations in progress, as they are not kept) and again while it
// is connected (the hub keeps its registry, as Azure does through an outage): the agent ends
// connected both times, without a restart, and the second time without a DPS call.
func TestEmulatorRestart(t *testing.T) {
	e := startEmulator(t, "--assign-delay", "1s", "--poll-limit", "0")
	g := x509Gateway(t, e, "gw-restart", "")
	ctx, cancel := context.WithTimeout(context.Background(), 120*time.Second)
	defer cancel()
	agent, out, exited := g.runAgent(t, ctx)
	g.awaitPhase(t, agent, exited, device.PhaseProvisioning, 30*time.Second)
	e.restart() // the operation the agent polls is forgotten
	g.awaitPhase(t, agent, exited, device.PhaseConnected, 60*time.Second)
	registered := e.registrations(t, "gw-restart")
	e.restart() // the connection ends; the hub still knows the device
	e.awaitConnected(t, "gw-restart", 60*time.Second)
	g.awaitPhase(t, agent, exited, device.PhaseConnected, 10*time.Second)
	assert.Equal(t, registered, e.registrations(t, "gw-restart"), "no DPS call after the restart")
	agent.Process.Signal(os.Interrupt)
	<-exited
	log := out.String()
	assert.Contains(t, log, "msg=stopped")
	assert.NotContains(t, log, "refused the identity")
}

// recordingClock is scaledClock that remembers the waits asked for.
type recordingClock struct {
	mu    sync.Mutex
	waits []time.Duration
}

func (c *recordingClock) Now() time.Time { return time.Now() }
func (c *recordingClock) After(d time.Duration) <-chan time.Time {
	c.mu.Lock()
	c.waits = append(c.waits, d)
	c.mu.Unlock()
	return time.After(time.Millisecond)
}

func (c *recordingClock) total() (sum, longest time.Duration, n int) {
	c.mu.Lock()
	defer c.mu.Unlock()
	for _, w := range c.waits {
		sum += w
		longest = max(longest, w)
	}
	return sum, longest, len(c.waits)
}

// TestDPSOutage: DPS refuses connections (CONNACK 3) and answers 500 and 503 for a long
// stretch, then recovers: the registration succeeds, every wait is within the backoff cap,
// and the simulated outage spans minutes.
func TestDPSOutage(t *testing.T) {
	s := dpstest.NewServer(t, func(c *dpstest.Config) {
		c.PollLimit = 0
		c.Faults = []dpstest.Fault{
			{Step: dpstest.StepConnect, Action: dpstest.Status, Status: 3, Times: 5},
			{Step: dpstest.StepRegister, Action: dpstest.Status, Status: 500, Times: 10},
			{Step: dpstest.StepPoll, Action: dpstest.Status, Status: 503, Times: 10},
		}
	})
	leaf, err := s.FactoryCA().NewDevice("gw-outage")
	require.NoError(t, err)
	cert := leaf.TLSCertificate()
	clock := &recordingClock{}
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	a, err := dps.Register(ctx, dps.Request{
		Endpoint: s.Addr(), IDScope: s.IDScope(), Transport: dial.TransportMQTT,
		RootCAs: s.RootCAs(), Certificate: &cert, Clock: clock,
	})
	require.NoError(t, err)
	assert.Equal(t, dpstest.DefaultHub, a.AssignedHub)
	sum, longest, n := clock.total()
	t.Logf("survived a %s outage in %d waits, the longest %s", sum.Round(time.Second), n, longest)
	assert.Greater(t, sum, 2*time.Minute, "the outage lasted minutes")
	assert.LessOrEqual(t, longest, 2*time.Minute, "no wait beyond the backoff cap")
	assert.GreaterOrEqual(t, n, 25)
}

// TestDPSQuota: a DPS instance that takes 2 registrations a minute, hit by 8 devices at
// once, answers 429 with retry-after; every device waits as told and is assigned.
func TestDPSQuota(t *testing.T) {
	vt := &virtualTime{}
	s := dpstest.NewServer(t, func(c *dpstest.Config) {
		c.PollLimit = 0
		c.RegistrationsPerMinute = 2
		c.Now = vt.Now
	})
	const devices = 8
	var wg sync.WaitGroup
	errs := make([]error, devices)
	for i := range devices {
		leaf, err := s.FactoryCA().NewDevice(fmt.Sprintf("gw-quota-%d", i))
		require.NoError(t, err)
		cert := leaf.TLSCertificate()
		wg.Add(1)
		go func() {
			defer wg.Done()
			ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
			defer cancel()
			_, errs[i] = dps.Register(ctx, dps.Request{
				Endpoint: s.Addr(), IDScope: s.IDScope(), Transport: dial.TransportMQTT,
				RootCAs: s.RootCAs(), Certificate: &cert, Clock: vt,
			})
		}()
	}
	wg.Wait()
	for i, err := range errs {
		assert.NoError(t, err, "device %d", i)
	}
	st := s.Stats()
	t.Logf("%d registrations, %d throttled, %d assigned over %s of DPS time", st.Registrations, st.Throttled, st.Assignments, vt.elapsed().Round(time.Second))
	assert.Greater(t, st.Throttled, int64(0), "the quota was hit")
	assert.Equal(t, int64(devices), st.Assignments)
}

// virtualTime is one clock for DPS and its devices: a device's wait moves it forward, so a
// quota that refills per minute refills as fast as the devices wait for it.
type virtualTime struct {
	mu     sync.Mutex
	offset time.Duration
}

func (v *virtualTime) Now() time.Time {
	v.mu.Lock()
	defer v.mu.Unlock()
	return time.Now().Add(v.offset)
}

func (v *virtualTime) After(d time.Duration) <-chan time.Time {
	v.mu.Lock()
	v.offset += d
	v.mu.Unlock()
	return time.After(time.Millisecond)
}

func (v *virtualTime) elapsed() time.Duration {
	v.mu.Lock()
	defer v.mu.Unlock()
	return v.offset
}

package dpstest_test

import (
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/unicity-iot/unicity/dps/dpstest"
)

func TestAssignDelay(t *testing.T) {
	now := newClock()
	s := dpstest.NewServer(t, func(c *dpstest.Config) { c.Now = now.Now; c.AssignDelay = 5 * time.Second })
	d := mustDial(t, s, dialOpts{regID: "slow", cert: factoryCert(t, s, "slow")})
	r := d.register("slow")
	require.Equal(t, 202, r.status)
	assert.Equal(t, 3, r.retryAfter, "default retry-after is 3 s, as Azure sends")
	op := r.body.OperationID

	now.Advance(4 * time.Second)
	r = d.poll(op)
	assert.Equal(t, 202, r.status)
	assert.Equal(t, 3, r.retryAfter)
	assert.JSONEq(t, `{"operationId":"`+op+`","status":"assigning","registrationState":{"registrationId":"slow","status":"assigning"}}`, string(r.raw))
	_, ok := s.Registration("slow")
	assert.False(t, ok, "nothing recorded before the operation completes")

	now.Advance(time.Second)
	r = d.poll(op)
	assert.Equal(t, 200, r.status)
	assert.Equal(t, "assigned", r.body.Status)
	// A repeated poll of a finished operation gives the same answer.
	again := d.poll(op)
	assert.Equal(t, string(r.raw), string(again.raw))
	assert.Equal(t, int64(1), s.Stats().Assignments)
}

func TestRetryAfterRoundsUp(t *testing.T) {
	s := dpstest.NewServer(t, func(c *dpstest.Config) { c.RetryAfter = 1500 * time.Millisecond })
	d := mustDial(t, s, dialOpts{regID: "r", cert: factoryCert(t, s, "r")})
	assert.Equal(t, 2, d.register("r").retryAfter)
}

// TestObeyingRetryAfterIsNotThrottled: a client that waits the announced retry-after between
// polls, by default or at the least MinRetryAfter allows, never meets the poll limit.
func TestObeyingRetryAfterIsNotThrottled(t *testing.T) {
	assert.Equal(t, 2*time.Second, dpstest.MinRetryAfter(dpstest.DefaultPollLimit))
	assert.Equal(t, 4*time.Second, dpstest.MinRetryAfter(3), "rounded up to whole seconds")
	assert.Equal(t, time.Duration(0), dpstest.MinRetryAfter(0))
	for _, retryAfter := range []time.Duration{dpstest.DefaultRetryAfter, dpstest.MinRetryAfter(dpstest.DefaultPollLimit)} {
		t.Run(retryAfter.String(), func(t *testing.T) {
			now := newClock()
			s := dpstest.NewServer(t, func(c *dpstest.Config) { c.Now = now.Now; c.AssignDelay = time.Hour; c.RetryAfter = retryAfter })
			d := mustDial(t, s, dialOpts{regID: "obedient", cert: factoryCert(t, s, "obedient")})
			r := d.register("obedient")
			for i := range 20 {
				require.Equal(t, 202, r.status, "request %d", i)
				now.Advance(time.Duration(r.retryAfter) * time.Second)
				r = d.poll(r.body.OperationID)
			}
			assert.Zero(t, s.Stats().Throttled)
		})
	}
}

func TestPollLimit(t *testing.T) {
	now := newClock()
	s := dpstest.NewServer(t, func(c *dpstest.Config) { c.Now = now.Now; c.AssignDelay = time.Hour })
	d := mustDial(t, s, dialOpts{regID: "eager", cert: factoryCert(t, s, "eager")})
	op := d.register("eager").body.OperationID
	for i := range dpstest.DefaultPollLimit {
		require.Equal(t, 202, d.poll(op).status, "poll %d", i+1)
		now.Advance(time.Second)
	}
	r := d.poll(op)
	assert.Equal(t, 429, r.status)
	assert.Equal(t, 5, r.retryAfter, "the first poll leaves the window 10 s after it was made")
	assert.Equal(t, 429002, r.body.ErrorCode)

	other := mustDial(t, s, dialOpts{regID: "calm", cert: factoryCert(t, s, "calm")})
	assert.Equal(t, 202, other.poll(other.register("calm").body.OperationID).status, "the limit is per device")

	now.Advance(5 * time.Second)
	assert.Equal(t, 202, d.poll(op).status)
	assert.Equal(t, int64(1), s.Stats().Throttled)
	assert.Equal(t, int64(dpstest.DefaultPollLimit+3), s.Stats().Polls)
}

func TestRegistrationQuota(t *testing.T) {
	now := newClock()
	s := dpstest.NewServer(t, fast, func(c *dpstest.Config) { c.Now = now.Now; c.RegistrationsPerMinute = 3 })
	for i := range 3 {
		id := string(rune('a' + i))
		d := mustDial(t, s, dialOpts{regID: id, cert: factoryCert(t, s, id)})
		require.Equal(t, 202, d.register(id).status)
		now.Advance(10 * time.Second)
	}
	d := mustDial(t, s, dialOpts{regID: "late", cert: factoryCert(t, s, "late")})
	r := d.register("late")
	assert.Equal(t, 429, r.status)
	assert.Equal(t, 30, r.retryAfter)
	assert.Equal(t, 429001, r.body.ErrorCode)
	now.Advance(30 * time.Second)
	assert.Equal(t, 202, d.register("late").status)
	assert.Equal(t, int64(1), s.Stats().Throttled)
	assert.Equal(t, int64(5), s.Stats().Registrations)
}

// TestRegistrationQuotaKeepsSlots: devices refused for the quota are each told a slot of
// their own, so that none of them is refused again when it comes back as told, and a newcomer
// queues behind them.
func TestRegistrationQuotaKeepsSlots(t *testing.T) {
	now := newClock()
	s := dpstest.NewServer(t, fast, func(c *dpstest.Config) { c.Now = now.Now; c.RegistrationsPerMinute = 2 })
	dev := map[string]*device{}
	register := func(id string) response {
		if dev[id] == nil {
			dev[id] = mustDial(t, s, dialOpts{regID: id, cert: factoryCert(t, s, id)})
		}
		return dev[id].register(id)
	}
	start := now.Now()
	at := func(sec int) { now.Advance(start.Add(time.Duration(sec) * time.Second).Sub(now.Now())) }

	require.Equal(t, 202, register("a").status) // t=0
	at(10)
	require.Equal(t, 202, register("b").status)
	for _, c := range []struct {
		id         string
		at, replay int // when it asks, and the retry-after it must get
	}{{"c", 20, 40}, {"d", 21, 49}, {"e", 22, 98}} {
		at(c.at)
		r := register(c.id)
		require.Equal(t, 429, r.status, c.id)
		assert.Equal(t, c.replay, r.retryAfter, "%s: the slot a minute after the registration or slot it follows", c.id)
	}
	at(30)
	r := register("c")
	assert.Equal(t, 429, r.status, "early")
	assert.Equal(t, 30, r.retryAfter, "early: the same slot")

	at(60)
	assert.Equal(t, 202, register("c").status, "c at its slot")
	r = register("f")
	assert.Equal(t, 429, r.status, "a newcomer queues behind the slots kept")
	assert.Equal(t, 70, r.retryAfter)
	at(70)
	assert.Equal(t, 202, register("d").status, "d at its slot")
	at(120)
	assert.Equal(t, 202, register("e").status, "e at its slot")
	at(130)
	assert.Equal(t, 202, register("f").status, "f at its slot")
	assert.Equal(t, int64(5), s.Stats().Throttled)
}

func TestMessageLimit(t *testing.T) {
	s := dpstest.NewServer(t, fast)
	body := func(size int) string {
		head := `{"registrationId":"big","payload":{"p":"`
		tail := `"}}`
		return head + strings.Repeat("x", size-len(head)-len(tail)) + tail
	}
	d := mustDial(t, s, dialOpts{regID: "big", cert: factoryCert(t, s, "big")})
	d.publish(registerTopic+"1", 1, body(dpstest.DefaultMaxMessageSize))
	assert.Equal(t, 202, d.next().status, "96 KB is allowed")
	d.client.Publish(registerTopic+"2", 1, false, body(dpstest.DefaultMaxMessageSize+1))
	assert.Error(t, d.closed(), "one byte more closes the connection")
}

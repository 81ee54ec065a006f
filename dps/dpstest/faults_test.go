package dpstest_test

import (
	"encoding/json"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/unicity-iot/unicity/dps/dpstest"
)

func TestConnectFaults(t *testing.T) {
	t.Run("drop", func(t *testing.T) {
		s := dpstest.NewServer(t, fast, func(c *dpstest.Config) {
			c.Faults = []dpstest.Fault{{Step: dpstest.StepConnect, Action: dpstest.Drop, Times: 1}}
		})
		_, err := dial(t, s, dialOpts{regID: "d", cert: factoryCert(t, s, "d")})
		assert.Error(t, err)
		mustDial(t, s, dialOpts{regID: "d", cert: factoryCert(t, s, "d")}) // Times: 1
	})
	t.Run("connack code", func(t *testing.T) {
		s := dpstest.NewServer(t, fast, func(c *dpstest.Config) {
			c.Faults = []dpstest.Fault{{Step: dpstest.StepConnect, Action: dpstest.Status, Status: 3}}
		})
		_, err := dial(t, s, dialOpts{regID: "d", cert: factoryCert(t, s, "d")})
		var ce *connectError
		require.ErrorAs(t, err, &ce)
		assert.Equal(t, byte(3), ce.code)
	})
	t.Run("delay", func(t *testing.T) {
		s := dpstest.NewServer(t, fast, func(c *dpstest.Config) {
			c.Faults = []dpstest.Fault{{Step: dpstest.StepConnect, Action: dpstest.Delay, Delay: 300 * time.Millisecond}}
		})
		start := time.Now()
		mustDial(t, s, dialOpts{regID: "d", cert: factoryCert(t, s, "d")})
		assert.GreaterOrEqual(t, time.Since(start), 300*time.Millisecond)
	})
}

func TestSubscribeFaults(t *testing.T) {
	s := dpstest.NewServer(t, fast)
	s.AddFault(dpstest.Fault{Step: dpstest.StepSubscribe, Action: dpstest.Status, RegistrationID: "refused"})
	s.AddFault(dpstest.Fault{Step: dpstest.StepSubscribe, Action: dpstest.Drop, RegistrationID: "dropped"})

	d := mustDial(t, s, dialOpts{regID: "refused", cert: factoryCert(t, s, "refused"), noSub: true})
	assert.Equal(t, byte(0x80), d.subscribe(resFilter, 1))

	d = mustDial(t, s, dialOpts{regID: "dropped", cert: factoryCert(t, s, "dropped"), noSub: true})
	d.client.Subscribe(resFilter, 1, nil)
	assert.Error(t, d.closed())

	mustDial(t, s, dialOpts{regID: "bystander", cert: factoryCert(t, s, "bystander")})
}

// TestRequestFaults applies every action to register and to poll.
func TestRequestFaults(t *testing.T) {
	for _, step := range []dpstest.Step{dpstest.StepRegister, dpstest.StepPoll} {
		name := map[dpstest.Step]string{dpstest.StepRegister: "register", dpstest.StepPoll: "poll"}[step]
		// send makes the request the fault is armed for and returns the rid it used.
		send := func(d *device) string {
			if step == dpstest.StepPoll {
				d.publish(registerTopic+"0", 1, "")
				op := d.next().body.OperationID
				d.client.Publish(pollTopic+"p1&operationId="+op, 1, false, "") // a dropped one is never acknowledged
				return "p1"
			}
			d.client.Publish(registerTopic+"r1", 1, false, "")
			return "r1"
		}
		normal := map[dpstest.Step]int{dpstest.StepRegister: 202, dpstest.StepPoll: 200}[step]

		t.Run(name, func(t *testing.T) {
			s := dpstest.NewServer(t, fast)
			// arm adds the fault for a device of its own and connects that device.
			arm := func(t *testing.T, regID string, f dpstest.Fault) *device {
				f.Step, f.RegistrationID = step, regID
				s.AddFault(f)
				return mustDial(t, s, dialOpts{regID: f.RegistrationID, cert: factoryCert(t, s, f.RegistrationID)})
			}
			t.Run("drop", func(t *testing.T) {
				d := arm(t, "drop", dpstest.Fault{Action: dpstest.Drop})
				send(d)
				assert.Error(t, d.closed())
				assert.Empty(t, d.msgs, "no answer")
			})
			t.Run("drop-after-reply", func(t *testing.T) {
				d := arm(t, "drop-after-reply", dpstest.Fault{Action: dpstest.DropAfterReply})
				send(d)
				assert.Equal(t, normal, d.next().status)
				assert.Error(t, d.closed())
			})
			t.Run("delay", func(t *testing.T) {
				d := arm(t, "delay", dpstest.Fault{Action: dpstest.Delay, Delay: 300 * time.Millisecond})
				rid := send(d)
				start := time.Now()
				d.quiet(150 * time.Millisecond)
				r := d.next()
				assert.GreaterOrEqual(t, time.Since(start), 250*time.Millisecond)
				assert.Equal(t, normal, r.status)
				assert.Equal(t, rid, r.rid)
			})
			t.Run("status", func(t *testing.T) {
				d := arm(t, "status", dpstest.Fault{Action: dpstest.Status, Status: 503, RetryAfter: 7 * time.Second})
				rid := send(d)
				r := d.next()
				assert.Equal(t, "$dps/registrations/res/503/?$rid="+rid+"&retry-after=7", r.topic)
				assert.Equal(t, 503000, r.body.ErrorCode)
			})
			t.Run("malformed", func(t *testing.T) {
				d := arm(t, "malformed", dpstest.Fault{Action: dpstest.Malformed})
				send(d)
				r := d.next()
				assert.Equal(t, normal, r.status, "the topic stays valid")
				assert.False(t, json.Valid(r.raw), "%s", r.raw)
			})
			t.Run("oversized", func(t *testing.T) {
				d := arm(t, "oversized", dpstest.Fault{Action: dpstest.Oversized})
				send(d)
				r := d.next()
				assert.Greater(t, len(r.raw), dpstest.DefaultMaxMessageSize)
				assert.True(t, json.Valid(r.raw))
			})
			t.Run("wrong-rid", func(t *testing.T) {
				d := arm(t, "wrong-rid", dpstest.Fault{Action: dpstest.WrongRID})
				rid := send(d)
				r := d.next()
				assert.NotEqual(t, rid, r.rid)
				assert.Equal(t, normal, r.status)
			})
		})
	}
}

func TestFaultSchedule(t *testing.T) {
	s := dpstest.NewServer(t, fast)
	s.AddFault(dpstest.Fault{Step: dpstest.StepRegister, Action: dpstest.Status, Status: 500, Skip: 1, Times: 2, RegistrationID: "Target"})
	d := mustDial(t, s, dialOpts{regID: "target", cert: factoryCert(t, s, "target")})
	other := mustDial(t, s, dialOpts{regID: "other", cert: factoryCert(t, s, "other")})
	var got []int
	for range 4 {
		got = append(got, d.register("target").status)
		assert.Equal(t, 202, other.register("other").status)
	}
	assert.Equal(t, []int{202, 500, 500, 202}, got)

	s.AddFault(dpstest.Fault{Step: dpstest.StepRegister, Action: dpstest.Status, Status: 500})
	assert.Equal(t, 500, d.register("target").status)
	s.ClearFaults()
	assert.Equal(t, 202, d.register("target").status)
}

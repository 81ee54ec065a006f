package dpstest_test

import (
	"errors"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/unicity-iot/unicity/dps/dpstest"
	"github.com/unicity-iot/unicity/sas"
)

// journal records what a Journal is told, keeping the latest of each record as a store
// would; fail makes every call fail.
type journal struct {
	mu       sync.Mutex
	regs     map[string]dpstest.Registration
	attempts map[uint64]dpstest.Attempt
	order    []uint64
	fail     error
}

func newJournal() *journal {
	return &journal{regs: map[string]dpstest.Registration{}, attempts: map[uint64]dpstest.Attempt{}}
}

func (j *journal) SaveRegistration(r dpstest.Registration) error {
	j.mu.Lock()
	defer j.mu.Unlock()
	j.regs[r.RegistrationID] = r
	return j.fail
}

func (j *journal) DeleteRegistration(regID string) error {
	j.mu.Lock()
	defer j.mu.Unlock()
	delete(j.regs, regID)
	return j.fail
}

func (j *journal) SaveAttempt(a dpstest.Attempt) error {
	j.mu.Lock()
	defer j.mu.Unlock()
	if _, ok := j.attempts[a.Seq]; !ok {
		j.order = append(j.order, a.Seq)
	}
	j.attempts[a.Seq] = a
	return j.fail
}

func (j *journal) saved() ([]dpstest.Registration, []dpstest.Attempt) {
	j.mu.Lock()
	defer j.mu.Unlock()
	var regs []dpstest.Registration
	for _, r := range j.regs {
		regs = append(regs, r)
	}
	var attempts []dpstest.Attempt
	for _, seq := range j.order {
		attempts = append(attempts, j.attempts[seq])
	}
	return regs, attempts
}

// TestAttempts: every register request is in the history with its outcome, throttled,
// refused and disabled ones included, and polls are counted against the operation.
func TestAttempts(t *testing.T) {
	now := newClock()
	j := newJournal()
	s := dpstest.NewServer(t, fast, func(c *dpstest.Config) {
		c.Now, c.Journal, c.RegistrationsPerMinute = now.Now, j, 2
		c.Hubs = []string{"hub-a"}
	})
	require.NoError(t, s.AddIndividual(dpstest.Individual{RegistrationID: "off", Thumbprint: "00", Policy: dpstest.Policy{Disabled: true}}))
	require.NoError(t, s.AddGroup(dpstest.Group{ID: "off-group", SymmetricKey: []byte("k"), Policy: dpstest.Policy{Disabled: true}}))

	d := mustDial(t, s, dialOpts{regID: "gw-1", cert: factoryCert(t, s, "gw-1")})
	start := now.Now()
	require.Equal(t, "assigned", d.provision("gw-1").body.Status)
	now.Advance(time.Second)
	off := mustDial(t, s, dialOpts{regID: "off-1", password: sasToken(s.IDScope(), "off-1", sas.DeviceKey([]byte("k"), "off-1"), now.Now().Add(time.Hour), false)})
	assert.Equal(t, "disabled", off.register("off-1").body.Status)
	assert.Equal(t, 429, d.register("gw-1").status, "over the quota of 2 a minute")

	got := s.Attempts("GW-1")
	require.Len(t, got, 2)
	first := got[0]
	assert.Equal(t, uint64(1), first.Seq)
	assert.Equal(t, dpstest.OutcomeAssigned, first.Outcome)
	assert.Equal(t, 200, first.Status)
	assert.Equal(t, 1, first.Polls)
	assert.Equal(t, "hub-a", first.Hub)
	assert.Equal(t, "gw-1", first.DeviceID)
	assert.Equal(t, dpstest.InitialAssignment, first.Substatus)
	assert.Regexp(t, opIDRE, first.OperationID)
	assert.True(t, first.Requested.Equal(start), "%v", first.Requested)
	assert.False(t, first.Completed.IsZero())
	assert.Equal(t, dpstest.Attempt{Seq: 3, RegistrationID: "gw-1", Requested: now.Now().UTC(), Outcome: dpstest.OutcomeThrottled,
		Status: 429, ErrorCode: 429001, Reason: "Registration quota of the service exceeded."}, got[1])
	disabled := s.Attempts("off-1")
	require.Len(t, disabled, 1)
	assert.Equal(t, dpstest.OutcomeDisabled, disabled[0].Outcome)
	assert.Equal(t, 200, disabled[0].Status)
	assert.Len(t, s.Attempts(""), 3)

	// What the journal kept restores the history and the registration on a new server,
	// which numbers its requests on from there.
	regs, attempts := j.saved()
	assert.Equal(t, s.Attempts(""), attempts)
	restarted := dpstest.NewServer(t, fast, func(c *dpstest.Config) { c.Now = now.Now; c.Hubs = []string{"hub-a"} })
	restarted.Restore(regs, attempts)
	assert.Equal(t, s.Attempts(""), restarted.Attempts(""))
	rec, ok := restarted.Registration("gw-1")
	require.True(t, ok)
	assert.Equal(t, "hub-a", rec.Hub)
	d = mustDial(t, restarted, dialOpts{regID: "gw-1", cert: factoryCert(t, restarted, "gw-1")})
	r := d.provision("gw-1")
	require.Equal(t, "assigned", r.body.Status)
	assert.Equal(t, dpstest.InitialAssignment, r.body.RegistrationState.Substatus, "the same hub again")
	again := restarted.Attempts("gw-1")
	require.Len(t, again, 3)
	assert.Equal(t, uint64(4), again[2].Seq)
}

// TestJournalFailure: a request whose record cannot be saved is not answered; its connection
// closes, so the device asks again rather than acting on an answer the service forgot.
func TestJournalFailure(t *testing.T) {
	j := newJournal()
	j.fail = errors.New("disk full")
	s := dpstest.NewServer(t, fast, func(c *dpstest.Config) { c.Journal = j })
	d := mustDial(t, s, dialOpts{regID: "gw-1", cert: factoryCert(t, s, "gw-1")})
	d.publish(registerTopic+"1", 0, `{"registrationId":"gw-1"}`) // QoS 0: no PUBACK comes either
	assert.Error(t, d.closed())
	assert.ErrorIs(t, s.DeleteRegistration("gw-1"), dpstest.ErrNotFound)
}

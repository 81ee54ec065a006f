package device

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/unicity-iot/unicity/attest"
	"github.com/unicity-iot/unicity/config"
	"github.com/unicity-iot/unicity/storage"
)

// StandaloneRegistration is a registration a command (`unicity provision`, `reprovision`)
// runs while the service does not: it holds the state lock throughout, so a service starting
// meanwhile waits for it rather than racing it. With issuance on it registers as the agent
// does: with a CSR for a new operational key, whose file is written before the state that
// names it; the keys of the state it replaces are destroyed once the new one is stored.
type StandaloneRegistration struct {
	Config      *config.Config
	Store       *storage.Store
	Provisioner Provisioner
	Credentials func(context.Context, *config.Config) (*Credentials, error) // default OpenCredentials
	Now         func() time.Time                                            // default time.Now
}

// Provision registers unless the state holds an assignment for this identity, and returns
// the assignment in force; fresh reports whether it registered.
func (s *StandaloneRegistration) Provision(ctx context.Context) (st *storage.State, fresh bool, err error) {
	return s.run(ctx, false, false)
}

// Reprovision registers again even if provisioned; force skips the rate limit. The previous
// assignment stays stored unless a new one replaces it.
func (s *StandaloneRegistration) Reprovision(ctx context.Context, force bool) (*storage.State, error) {
	st, _, err := s.run(ctx, true, force)
	return st, err
}

func (s *StandaloneRegistration) run(ctx context.Context, again, force bool) (*storage.State, bool, error) {
	now := s.Now
	if now == nil {
		now = time.Now
	}
	open := s.Credentials
	if open == nil {
		open = OpenCredentials
	}
	lock, err := s.Store.TryLock()
	if errors.Is(err, storage.ErrLocked) {
		return nil, false, Mark(fmt.Errorf("%w (is the service starting? try again, or see `unicity status`)", err), ErrTemporary)
	}
	if err != nil {
		return nil, false, err
	}
	defer lock.Unlock()

	creds, err := open(ctx, s.Config)
	if err != nil {
		return nil, false, err
	}
	defer creds.Close()
	id, err := creds.Identity(now())
	if err != nil {
		return nil, false, err
	}
	binding := creds.StateBinding()

	prev, err := lock.Load()
	switch {
	case errors.Is(err, storage.ErrNotExist), errors.Is(err, storage.ErrCorrupt):
		prev = nil
	case err != nil:
		return nil, false, err
	case !prev.BelongsTo(id.RegistrationID, binding):
		prev = nil
	}
	if prev != nil && !again && s.Config.Certificates.Issued() && !operationalUsable(creds, prev, now()) {
		// The agent would register for one at its start, at once: so does provision.
		again, force = true, true
	}
	if prev != nil {
		if !again {
			return prev, false, nil
		}
		if !force {
			if err := checkRateLimit(s.Config.Agent, prev, now()); err != nil {
				return nil, false, err
			}
		}
	}
	if err := lock.CheckWritable(); err != nil {
		return nil, false, fmt.Errorf("not registering, the assignment could not be stored: %w", err)
	}
	var key *attest.Key
	if s.Config.Certificates.Issued() {
		if key, err = newOperationalKey(creds, s.Config); err != nil {
			return nil, false, err
		}
		defer key.Close()
	}
	st, _, err := registerCSR(ctx, s.Provisioner, id, key, binding, prev, now, 1, now())
	if err != nil {
		return nil, false, err
	}
	if prev != nil {
		st.LastRenewal = prev.LastRenewal // as the agent keeps it
	}
	if err := lock.Save(st); err != nil {
		// The key stays: whether the write got through is unknown, and the agent's start
		// destroys the keyfiles no stored state names.
		return nil, false, fmt.Errorf("DPS assigned %s to %s, but %w", st.DeviceID, st.AssignedHub, err)
	}
	destroyReplaced(prev, st)
	return st, true, nil
}

// operationalUsable reports whether the agent could reach the hub with an operational
// credential st holds: the one in force, or the renewed one on trial, which the agent puts in
// force when the other cannot be used.
func operationalUsable(creds *Credentials, st *storage.State, now time.Time) bool {
	usable := func(spec string, chain [][]byte) bool {
		op, err := loadOperational(creds, spec, chain, now)
		op.close()
		return err == nil
	}
	return usable(st.OperationalKey, st.IssuedChain) || (st.Renewal != nil && usable(st.Renewal.OperationalKey, st.Renewal.IssuedChain))
}

// destroyReplaced destroys the operational keys prev named that st, stored in its place, does
// not: the certificate in force before and a renewed one on trial. One that cannot be removed
// now is left for the agent's start, which destroys the keyfiles no stored state names.
func destroyReplaced(prev, st *storage.State) {
	if prev == nil {
		return
	}
	for _, spec := range prev.OperationalKeys() {
		if spec != st.OperationalKey {
			_ = attest.DestroyKey(nil, spec)
		}
	}
}

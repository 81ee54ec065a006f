package device

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/unicity-iot/unicity/config"
	"github.com/unicity-iot/unicity/storage"
)

// StandaloneRegistration is a registration a command (`unicity provision`, `reprovision`)
// runs while the service does not: it holds the state lock throughout, so a service starting
// meanwhile waits for it rather than racing it.
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
	st, err := registerBound(ctx, s.Provisioner, id, binding, prev, now, 1, now())
	if err != nil {
		return nil, false, err
	}
	if err := lock.Save(st); err != nil {
		return nil, false, fmt.Errorf("DPS assigned %s to %s, but %w", st.DeviceID, st.AssignedHub, err)
	}
	return st, true, nil
}

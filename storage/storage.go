// Package storage keeps the provisioning state on disk: one versioned JSON file, bound to the
// identity it was obtained with, replaced atomically and written only under an exclusive lock.
// It records what DPS said; deciding what that means is the agent's job.
package storage

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/unicity-iot/unicity/internal/atomicfile"
)

// Version is the state file format this package writes and reads.
const Version = 1

// Names of the files in the state directory.
const (
	FileName = "state.json"
	lockName = "state.lock"
)

var (
	// ErrNotExist: no state file, the device has not been provisioned yet.
	ErrNotExist = errors.New("no provisioning state")
	// ErrCorrupt: the state file could not be used. When read under the lock, it has been
	// renamed aside (never deleted) and the device should register again.
	ErrCorrupt = errors.New("provisioning state is corrupt")
	// ErrLocked: another process holds the state lock (the service, or a command run by hand).
	ErrLocked = errors.New("provisioning state is locked by another unicity process")
	// ErrDiskFull: the state directory's file system has no space (or quota) left for the
	// state. Freeing space cures it.
	ErrDiskFull = errors.New("its file system is full")
	// ErrReadOnly: the state directory's file system is mounted read-only.
	ErrReadOnly = errors.New("its file system is read-only")
)

// State is what the last successful registration with DPS returned, and for which identity.
type State struct {
	Version int `json:"version"`

	// The identity this assignment belongs to: a different certificate or key (replaced, or
	// a cloned SD-card image) must not reuse it. Binding is the leaf certificate's SHA-256
	// thumbprint, or for a symmetric key "sas:" and a digest of it; its JSON key predates
	// symmetric keys and stays, a file contract.
	RegistrationID string `json:"registration_id"`
	Binding        string `json:"cert_sha256"`

	AssignedHub string          `json:"assigned_hub"`
	DeviceID    string          `json:"device_id"`
	Substatus   string          `json:"substatus,omitempty"`
	Transport   string          `json:"transport,omitempty"`
	Payload     json.RawMessage `json:"payload,omitempty"`
	// IssuedChain is the DER certificates DPS issued, if any, leaf first.
	IssuedChain [][]byte `json:"issued_chain,omitempty"`
	// OperationalKey is where the key of IssuedChain's leaf lives ("tpmkey:" and a TSS2
	// keyfile in the state directory), written before this state names it. A file written
	// before this field existed has neither, and loads as a state without an operational
	// certificate: the format version stays 1, as an agent that does not know the field
	// ignores it and connects with the onboarding identity.
	OperationalKey string `json:"operational_key,omitempty"`
	// Renewal is an operational certificate a renewal obtained that the hub has not yet
	// accepted a connection with. IssuedChain and OperationalKey stay in force until it has,
	// and it then replaces them; one the hub refuses is dropped.
	Renewal *Renewal `json:"renewal,omitempty"`
	// LastRenewal is the outcome of the latest renewal of the operational certificate.
	LastRenewal *RenewalResult `json:"last_renewal,omitempty"`
	// OnboardingChain (DER, leaf first) and OnboardingKey (its key's spec) are the onboarding
	// identity Binding names, so that the agent can still prove it while a new onboarding
	// certificate, installed in its place, is not accepted by DPS yet (a certificate roll). A
	// file without them loads as before; the agent then cannot keep the old identity across
	// a restart during a roll.
	OnboardingChain [][]byte `json:"onboarding_chain,omitempty"`
	OnboardingKey   string   `json:"onboarding_key,omitempty"`

	// ProvisionedAt is when this assignment was stored; DPSCreatedAt and DPSUpdatedAt are the
	// registration record's own times.
	ProvisionedAt time.Time `json:"provisioned_at"`
	DPSCreatedAt  time.Time `json:"dps_created_at,omitzero"`
	DPSUpdatedAt  time.Time `json:"dps_updated_at,omitzero"`
	// Attempts and Duration describe the registration that produced this state: how many
	// tries, and how long from the first try to the assignment.
	Attempts int           `json:"attempts,omitempty"`
	Duration time.Duration `json:"duration_ns,omitempty"`
}

// OperationalKeys are the keys of the operational credentials s names: the one in force and a
// renewed one on trial.
func (s *State) OperationalKeys() []string {
	var keys []string
	if s.OperationalKey != "" {
		keys = append(keys, s.OperationalKey)
	}
	if s.Renewal != nil && s.Renewal.OperationalKey != "" {
		keys = append(keys, s.Renewal.OperationalKey)
	}
	return keys
}

// Renewal is an operational credential on trial: its chain (DER, leaf first) and its key,
// as in State.
type Renewal struct {
	IssuedChain    [][]byte `json:"issued_chain"`
	OperationalKey string   `json:"operational_key"`
	// Via is the path that issued it: "hub" or "dps".
	Via      string    `json:"via"`
	IssuedAt time.Time `json:"issued_at"`
}

// Outcomes of a renewal (RenewalResult.Result).
const (
	Renewed       = "renewed"
	RenewalFailed = "failed"
)

// RenewalResult is how a renewal ended.
type RenewalResult struct {
	At     time.Time `json:"at"`
	Result string    `json:"result"`
	Via    string    `json:"via"`
	// Thumbprint is the renewed certificate's SHA-256 thumbprint; Error why it failed.
	Thumbprint string `json:"sha256_thumbprint,omitempty"`
	Error      string `json:"error,omitempty"`
}

// BelongsTo reports whether the state was obtained with this identity. Registration IDs
// compare case-insensitively, as DPS treats them.
func (s *State) BelongsTo(registrationID, binding string) bool {
	return strings.EqualFold(s.RegistrationID, registrationID) && strings.EqualFold(s.Binding, binding)
}

// check rejects a state that cannot stand for an assignment.
func (s *State) check() error {
	switch {
	case s.Version != Version:
		return fmt.Errorf("format version %d, this agent reads version %d", s.Version, Version)
	case s.RegistrationID == "" || s.Binding == "":
		return errors.New("no identity recorded")
	case s.AssignedHub == "" || s.DeviceID == "":
		return errors.New("no assigned hub or device ID")
	}
	return nil
}

// Store is the state directory.
type Store struct {
	dir string
}

// New returns the store in dir. Nothing is touched until the state is read or locked.
func New(dir string) *Store {
	return &Store{dir: dir}
}

// Path is the state file's path.
func (s *Store) Path() string { return filepath.Join(s.dir, FileName) }

// Load reads the state without the lock, for readers such as `unicity status`: the file is
// only ever replaced whole, so what it returns is always one complete state. A corrupt file
// is reported with ErrCorrupt and left in place for the lock holder to set aside.
func (s *Store) Load() (*State, error) {
	st, err := s.read()
	var u *unusableError
	if errors.As(err, &u) {
		return nil, fmt.Errorf("%s: %w: %w", s.Path(), ErrCorrupt, u.err)
	}
	return st, err
}

// unusableError is a state file that was read but cannot be used.
type unusableError struct{ err error }

func (e *unusableError) Error() string { return e.err.Error() }

func (s *Store) read() (*State, error) {
	data, err := os.ReadFile(s.Path())
	if errors.Is(err, fs.ErrNotExist) {
		return nil, ErrNotExist
	}
	if err != nil {
		return nil, fmt.Errorf("cannot read %s: %w", s.Path(), err)
	}
	var st State
	dec := json.NewDecoder(bytes.NewReader(data))
	if err := dec.Decode(&st); err != nil {
		return nil, &unusableError{err}
	}
	if dec.More() {
		return nil, &unusableError{errors.New("trailing data after the state")}
	}
	if err := st.check(); err != nil {
		return nil, &unusableError{err}
	}
	return &st, nil
}

// Lock takes the state lock, waiting for it until ctx is done. The service holds it for as
// long as it runs; commands run by hand hold it for one operation.
func (s *Store) Lock(ctx context.Context) (*Locked, error) {
	const poll = 100 * time.Millisecond
	for {
		l, err := s.TryLock()
		if !errors.Is(err, ErrLocked) {
			return l, err
		}
		t := time.NewTimer(poll)
		select {
		case <-ctx.Done():
			t.Stop()
			return nil, err
		case <-t.C:
		}
	}
}

// TryLock takes the state lock or fails at once with ErrLocked. It creates the state
// directory (0700) if needed, and removes temporary files that a writer killed mid-write
// left behind: with the lock held, no one else is writing. On a read-only file system it
// fails with ErrReadOnly.
func (s *Store) TryLock() (*Locked, error) {
	if err := os.MkdirAll(s.dir, 0o700); err != nil {
		return nil, s.fsError("cannot create the state directory", err)
	}
	f, err := os.OpenFile(filepath.Join(s.dir, lockName), os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return nil, s.fsError("cannot open the state lock", err)
	}
	return s.flock(f)
}

// TryLockReadOnly takes the lock of a state directory on a read-only file system, where
// TryLock fails with ErrReadOnly: the state can be loaded, and every Save fails with
// ErrReadOnly. It needs the lock file a writer made before the file system went read-only.
func (s *Store) TryLockReadOnly() (*Locked, error) {
	f, err := os.Open(filepath.Join(s.dir, lockName))
	if err != nil {
		return nil, s.fsError("cannot open the state lock", err)
	}
	return s.flock(f)
}

func (s *Store) flock(f *os.File) (*Locked, error) {
	if err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB); err != nil {
		f.Close()
		if errors.Is(err, syscall.EWOULDBLOCK) {
			return nil, fmt.Errorf("%s: %w", s.dir, ErrLocked)
		}
		return nil, fmt.Errorf("cannot lock the state: %w", err)
	}
	stale, _ := filepath.Glob(atomicfile.TempGlob(s.Path()))
	for _, p := range stale {
		os.Remove(p)
	}
	return &Locked{store: s, f: f}, nil
}

// Locked is the store while this process holds the lock: the only way to change the state.
type Locked struct {
	store *Store
	f     *os.File
}

// Unlock releases the lock.
func (l *Locked) Unlock() error {
	return l.f.Close()
}

// Load reads the state. A corrupt or unreadable file is renamed aside
// (state.json.corrupt-<UTC time>), never deleted, and reported with ErrCorrupt so that the
// device registers again instead of stopping on it.
func (l *Locked) Load() (*State, error) {
	st, err := l.store.read()
	if err == nil || errors.Is(err, ErrNotExist) {
		return st, err
	}
	cause := err
	var u *unusableError
	if errors.As(err, &u) {
		cause = u.err
	}
	aside, rerr := l.setAside()
	if rerr != nil {
		return nil, fmt.Errorf("%s: %w: %w (and it cannot be set aside: %w)", l.store.Path(), ErrCorrupt, cause, rerr)
	}
	return nil, fmt.Errorf("%s: %w: %w; kept as %s", l.store.Path(), ErrCorrupt, cause, aside)
}

func (l *Locked) setAside() (string, error) {
	aside := l.store.Path() + ".corrupt-" + time.Now().UTC().Format("20060102T150405.000000000Z")
	return aside, atomicfile.Rename(l.store.Path(), aside)
}

// Save replaces the state with st, atomically: a reader, or a process killed at any point,
// sees either the previous state or st, never a mix. The file is private (0600).
func (l *Locked) Save(st *State) error {
	saved := *st
	saved.Version = Version
	if err := saved.check(); err != nil {
		return fmt.Errorf("cannot save the provisioning state: %w", err)
	}
	data, err := json.Marshal(&saved)
	if err != nil {
		return fmt.Errorf("cannot encode the provisioning state: %w", err)
	}
	if err := atomicfile.Write(l.store.Path(), append(data, '\n'), 0o600); err != nil {
		return l.store.fsError("cannot store the provisioning state", err)
	}
	st.Version = Version
	return nil
}

// probeSize is more than a state file takes, issued certificate chain included.
const probeSize = 8 << 10

// CheckWritable makes sure a state can be saved now, by writing (and removing) a file of a
// state's size: a registration with DPS is billed and counted against its quota, and one
// whose result the disk then refuses is lost. ErrDiskFull or ErrReadOnly say why not.
func (l *Locked) CheckWritable() error {
	f, err := os.CreateTemp(l.store.dir, filepath.Base(atomicfile.TempGlob(l.store.Path())))
	if err != nil {
		return l.store.fsError("cannot write", err)
	}
	defer os.Remove(f.Name())
	defer f.Close()
	if _, err := f.Write(make([]byte, probeSize)); err != nil {
		return l.store.fsError("cannot write", err)
	}
	if err := f.Sync(); err != nil {
		return l.store.fsError("cannot write", err)
	}
	return nil
}

// fsError names the state directory in err, and what is wrong with its file system when
// that is the cause (ErrDiskFull, ErrReadOnly).
func (s *Store) fsError(what string, err error) error {
	switch {
	case errors.Is(err, syscall.ENOSPC), errors.Is(err, syscall.EDQUOT):
		return fmt.Errorf("%s in %s: %w (%w)", what, s.dir, ErrDiskFull, err)
	case errors.Is(err, syscall.EROFS):
		return fmt.Errorf("%s in %s: %w (%w)", what, s.dir, ErrReadOnly, err)
	}
	return fmt.Errorf("%s in %s: %w", what, s.dir, err)
}

package device

import (
	"context"
	"crypto/rand"
	"crypto/x509"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"github.com/unicity-iot/unicity/attest"
	"github.com/unicity-iot/unicity/config"
	"github.com/unicity-iot/unicity/internal/atomicfile"
	"github.com/unicity-iot/unicity/internal/certcodec"
	"github.com/unicity-iot/unicity/storage"
)

// Operational certificates ([certificates] issuance = "dps", certificates.md §1): the factory
// identity only onboards with DPS; each registration sends a CSR for a new key made in the
// TPM, and the hub is reached with the certificate DPS issues for it. The key's file is
// written before the state that names it, so a power cut leaves at most a keyfile no state
// names, which the next start destroys (collectKeys).

// CredentialState is which credential the hub is reached with, as the status shows it.
type CredentialState string

const (
	// CredentialOnboarding: issuance is off; the factory identity serves DPS and the hub.
	CredentialOnboarding CredentialState = "onboarding"
	// CredentialOperational: the hub is reached with a certificate DPS issued.
	CredentialOperational CredentialState = "operational"
	// CredentialNeeded: issuance is on and no operational certificate can be used (none yet,
	// expired, refused by the hub, its key gone): the agent registers for one with the
	// onboarding identity.
	CredentialNeeded CredentialState = "needed"
)

// operationalKeyGlob matches the keyfiles the agent makes in the state directory.
const operationalKeyGlob = "operational-*.key"

// ErrOperationalExpired marks an operational certificate whose NotAfter has passed: the
// agent registers again with the onboarding identity for a new one.
var ErrOperationalExpired = errors.New("the operational certificate has expired")

// operational is an operational credential: its key, loaded, and the identity its issued
// chain makes with it.
type operational struct {
	key *attest.Key
	id  *attest.Identity
}

// Spec is where the key lives, as the state names it.
func (o *operational) spec() string { return o.key.Location }

// close flushes the key from the TPM; its file stays.
func (o *operational) close() {
	if o != nil {
		o.key.Close()
	}
}

// newOperationalKey makes the key of the next registration's CSR, in a file no state names
// yet.
func (r *run) newOperationalKey() (*attest.Key, error) {
	done := r.a.covered(attest.KeyGenerationTimeout + 5*time.Second)
	defer done()
	return newOperationalKey(r.creds, r.a.Config)
}

// newOperationalKey makes, in creds' TPM, a key of cfg's type for a CSR, in a file of the
// state directory that no state names yet.
func newOperationalKey(creds *Credentials, cfg *config.Config) (*attest.Key, error) {
	tpm, err := creds.TPM()
	if err != nil {
		creds.retryTPM() // the next attempt opens it again
		return nil, fmt.Errorf("cannot make an operational key: %w", err)
	}
	path := filepath.Join(cfg.State.Dir, "operational-"+rand.Text()+".key")
	key, err := attest.NewOperationalKey(tpm, cfg.Certificates.KeyType, path)
	if err != nil {
		return nil, fmt.Errorf("cannot make an operational key: %w", err)
	}
	return key, nil
}

// loadOperational opens the operational credential of chain, whose key is spec, and checks
// it at now. One without a chain, or whose key is gone, fails: the agent registers for a new
// one.
func (r *run) loadOperational(spec string, chain [][]byte, now time.Time) (*operational, error) {
	return loadOperational(r.creds, spec, chain, now)
}

// loadOperational opens, in creds' TPM, the operational credential of chain whose key is
// spec, and checks it at now.
func loadOperational(creds *Credentials, spec string, chain [][]byte, now time.Time) (*operational, error) {
	if spec == "" || len(chain) == 0 {
		return nil, errors.New("the stored assignment has no operational certificate")
	}
	if _, err := os.Stat(strings.TrimPrefix(spec, "tpmkey:")); errors.Is(err, fs.ErrNotExist) {
		return nil, fmt.Errorf("the key of the operational certificate is missing (%s)", spec)
	}
	tpm, err := creds.TPM()
	if err != nil {
		return nil, fmt.Errorf("cannot load the operational key: %w", err)
	}
	key, err := attest.LoadKey(tpm, spec)
	if err != nil {
		return nil, fmt.Errorf("cannot load the operational key: %w", err)
	}
	o, err := issued(chain, key, now)
	if err != nil {
		key.Close()
		return nil, err
	}
	return o, nil
}

// awaitOperational loads an operational credential, waiting while the TPM does not answer:
// registering again for that would cost a registration and a new key, and cure nothing.
func (r *run) awaitOperational(ctx context.Context, spec string, chain [][]byte) (*operational, error) {
	for attempt := 1; ; attempt++ {
		done := r.a.covered(identityLoadBound)
		op, err := r.loadOperational(spec, chain, r.a.Clock.Now())
		done()
		if !errors.Is(err, attest.ErrTPMUnavailable) {
			return op, err
		}
		r.creds.retryTPM()
		r.refusal = Mark(fmt.Errorf("the agent is not ready: waiting for the TPM: %w", err), ErrTemporary)
		req, werr := r.retryLater(ctx, PhaseWaitingTPM, "waiting for the TPM to load the operational key", err, attempt, r.a.Backoff(attempt))
		if werr != nil {
			return nil, werr
		}
		if req != nil {
			r.answer(ctx, req)
		}
	}
}

// loadCredentials opens the operational credential st holds, and a renewed one on trial
// (into r.ren). A renewed one that cannot be used is dropped. When only the renewed one can
// be used (the old one expired while the device was off), it is put in force untried: if
// the hub refuses it, the agent registers with the onboarding identity, as for any.
func (r *run) loadCredentials(ctx context.Context, st *storage.State) (*operational, error) {
	op, err := r.awaitOperational(ctx, st.OperationalKey, st.IssuedChain)
	r.ren = renewal{last: st.LastRenewal}
	if st.Renewal == nil || ctx.Err() != nil {
		return op, err
	}
	cand, cerr := r.awaitOperational(ctx, st.Renewal.OperationalKey, st.Renewal.IssuedChain)
	if ctx.Err() != nil {
		op.close()
		return nil, ctx.Err()
	}
	var old string
	switch {
	case cerr != nil:
		r.a.NoteError(fmt.Errorf("the renewed operational certificate is dropped: %w", cerr))
		old = st.Renewal.OperationalKey
		st.Renewal = nil
	case err != nil:
		op.close()
		op, err = cand, nil
		old = st.OperationalKey
		st.IssuedChain, st.OperationalKey, st.Renewal = st.Renewal.IssuedChain, st.Renewal.OperationalKey, nil
	default:
		r.ren.candidate, r.ren.via = cand, st.Renewal.Via
		return op, nil
	}
	if r.store(ctx, st) {
		r.destroyKey(old)
		r.storedKey = st.OperationalKey
	}
	return op, err
}

// issued checks a chain issued for key at now.
func issued(chain [][]byte, key *attest.Key, now time.Time) (*operational, error) {
	id, err := attest.IssuedIdentity(chain, key, now)
	if errors.Is(err, attest.ErrExpired) {
		return nil, Mark(fmt.Errorf("%w: %w", ErrOperationalExpired, err), ErrOperationalExpired)
	}
	if err != nil {
		return nil, fmt.Errorf("the operational certificate cannot be used: %w", err)
	}
	return &operational{key: key, id: id}, nil
}

// dropOperational stops using the operational credential, which no longer works: the agent
// registers with the onboarding identity for a new one.
func (r *run) dropOperational(why string) {
	r.a.credentialEvent(CredentialEvent{Kind: EventFellBack, Reason: why, Replaced: certcodec.Thumbprint(r.op.id.Chain[0])})
	r.op.close()
	r.op = nil
	r.setCredential(CredentialNeeded)
	r.showRenewal(nil)
}

// Kinds of CredentialEvent.
const (
	// EventIssued: DPS issued an operational certificate, now the hub's credential.
	EventIssued = "issued"
	// EventFellBack: the operational certificate cannot be used (Reason says why); the
	// agent registers with the onboarding identity for a new one.
	EventFellBack = "fell_back_to_onboarding"
)

// CredentialEvent is a change of the credential the hub is reached with, for the service's
// log (Agent.OnCredential).
type CredentialEvent struct {
	Kind string
	// Via is the path of a renewal: ViaHub or ViaDPS.
	Via string
	// Thumbprint is the new operational certificate's SHA-256 thumbprint (issued), Replaced
	// that of the one before it, if any.
	Thumbprint, Replaced string
	NotAfter             time.Time
	// Key is where the new certificate's key lives.
	Key    string
	Reason string
}

func (a *Agent) credentialEvent(ev CredentialEvent) {
	if a.OnCredential != nil {
		a.OnCredential(ev)
	}
}

// storedThumbprint is the thumbprint of st's operational certificate, "" when it has none.
func storedThumbprint(st *storage.State) string {
	if st == nil || len(st.IssuedChain) == 0 {
		return ""
	}
	c, err := x509.ParseCertificate(st.IssuedChain[0])
	if err != nil {
		return ""
	}
	return certcodec.Thumbprint(c)
}

// collectKeys destroys the keyfiles in the state directory that the stored state does not
// name: made for a registration whose state a power cut or a failure kept from being stored,
// or replaced by a newer one. Keyfile keys are no TPM objects, so removing the file is all.
func (r *run) collectKeys(keep ...string) {
	dir := r.a.Config.State.Dir
	paths, _ := filepath.Glob(filepath.Join(dir, operationalKeyGlob))
	temps, _ := filepath.Glob(atomicfile.TempGlob(filepath.Join(dir, operationalKeyGlob)))
	for _, p := range paths {
		if slices.Contains(keep, "tpmkey:"+p) {
			continue
		}
		if err := attest.DestroyKey(nil, "tpmkey:"+p); err != nil {
			r.a.NoteError(fmt.Errorf("cannot remove an unused operational key: %w", err))
		}
	}
	for _, p := range temps {
		os.Remove(p)
	}
}

// destroyKey destroys the key of an operational certificate no stored state names any more.
func (r *run) destroyKey(spec string) {
	if spec == "" {
		return
	}
	if err := attest.DestroyKey(nil, spec); err != nil {
		r.a.NoteError(fmt.Errorf("cannot remove the replaced operational key: %w", err))
	}
}

// CertificateInfo describes a credential's certificate for `status`, `identity` and `check`:
// its manifest (as `factory install` prints it) with its role, where its key lives and the
// days it has left.
type CertificateInfo struct {
	// Role is "onboarding" (the factory identity, for DPS) or "operational" (issued by DPS,
	// for the hub).
	Role    string `json:"role"`
	Subject string `json:"subject"`
	attest.Manifest
	// DaysLeft is the whole days until NotAfter, negative once it passed.
	DaysLeft int `json:"days_left"`
	// Key is where the certificate's key lives, as the configuration or the state names it.
	Key string `json:"key"`
	// Renewal is the operational certificate's (DescribeRenewal).
	Renewal *RenewalInfo `json:"renewal,omitempty"`
}

// DescribeCertificate is the CertificateInfo of c at now.
func DescribeCertificate(role string, c *x509.Certificate, key string, now time.Time) CertificateInfo {
	return CertificateInfo{
		Role: role, Subject: c.Subject.String(), Manifest: attest.NewManifest(c),
		DaysLeft: int(c.NotAfter.Sub(now).Hours() / 24), Key: key,
	}
}

// StoredOperational describes the operational certificate st holds, without the TPM; nil
// when it holds none.
func StoredOperational(st *storage.State, now time.Time) (*CertificateInfo, error) {
	if len(st.IssuedChain) == 0 {
		return nil, nil
	}
	c, err := x509.ParseCertificate(st.IssuedChain[0])
	if err != nil {
		return nil, fmt.Errorf("the stored operational certificate: %w", err)
	}
	info := DescribeCertificate("operational", c, st.OperationalKey, now)
	return &info, nil
}

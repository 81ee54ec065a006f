package device

import (
	"context"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"strings"
	"sync"

	keyfile "github.com/foxboron/go-tpm-keyfiles"

	"github.com/unicity-iot/unicity/attest"
	"github.com/unicity-iot/unicity/config"
	"github.com/unicity-iot/unicity/sas"
)

// TPMIdentity is the TPM attestation side of the credentials: the endorsement key DPS's
// enrollment names, the storage root key DPS sends the identity key to, and that key once
// DPS's challenge has been answered (or found where an earlier registration kept it). It
// signs SAS tokens for DPS and the hub in the TPM; the key never leaves it.
type TPMIdentity struct {
	EK  *attest.EndorsementKey
	SRK *attest.StorageRootKey
	// KeySpec is where the identity key is kept ([attestation] identity_key): a persistent
	// handle or a keyfile.
	KeySpec string

	tpm *attest.TPM
	mu  sync.Mutex
	key *attest.HMACKey // nil until imported
}

// openTPMIdentity reads the EK, opens (or creates and persists) the SRK and loads the
// identity key when an earlier registration imported one.
func openTPMIdentity(ctx context.Context, tpm *attest.TPM, a config.Attestation) (*TPMIdentity, error) {
	srkHandle, err := attest.ParsePersistentHandle(a.SRKHandle)
	if err != nil {
		return nil, err
	}
	ek, err := attest.ReadEndorsementKey(ctx, tpm)
	if err != nil {
		return nil, fmt.Errorf("cannot read the endorsement key: %w", err)
	}
	srk, err := attest.OpenSRK(ctx, tpm, srkHandle)
	if err != nil {
		return nil, err
	}
	t := &TPMIdentity{EK: ek, SRK: srk, KeySpec: a.IdentityKey, tpm: tpm}
	key, err := attest.LoadHMACKey(ctx, tpm, a.IdentityKey)
	switch {
	case err == nil:
		t.key = key
	case errors.Is(err, attest.ErrTPMUnavailable):
		return nil, err
	}
	// Any other failure means no usable key is kept there yet: the registration imports one.
	return t, nil
}

// Imported reports whether the TPM holds the identity key DPS sent.
func (t *TPMIdentity) Imported() bool {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.key != nil
}

// Sign makes a SAS signature with the identity key, in the TPM.
func (t *TPMIdentity) Sign(ctx context.Context, data []byte) ([]byte, error) {
	t.mu.Lock()
	key := t.key
	t.mu.Unlock()
	if key == nil {
		return nil, fmt.Errorf("%w: the TPM holds no identity key at %s yet: the device must register with DPS", attest.ErrInvalidKey, t.KeySpec)
	}
	return key.Sign(ctx, data)
}

// Activate answers DPS's challenge (dps.TPM.Activate): the TPM imports the identity key,
// which is then kept where KeySpec says, replacing the one of an earlier registration, and
// signs from then on.
func (t *TPMIdentity) Activate(ctx context.Context, authenticationKey []byte) (sas.Signer, error) {
	k, err := attest.ImportIdentityKey(ctx, t.tpm, t.EK, t.SRK, authenticationKey)
	if err != nil {
		return nil, err
	}
	if err := t.keep(ctx, k); err != nil {
		return nil, err
	}
	key, err := attest.LoadHMACKey(ctx, t.tpm, t.KeySpec)
	if err != nil {
		return nil, fmt.Errorf("cannot load the identity key just imported: %w", err)
	}
	t.mu.Lock()
	old := t.key
	t.key = key
	t.mu.Unlock()
	if old != nil {
		old.Close()
	}
	return t, nil
}

// keep persists the imported key at KeySpec's handle or writes it as KeySpec's keyfile (a
// new file renamed over the old one, so that a cut leaves one of the two whole).
func (t *TPMIdentity) keep(ctx context.Context, k *keyfile.TPMKey) error {
	rest := strings.TrimPrefix(t.KeySpec, "tpmkey:")
	if h, ok := strings.CutPrefix(rest, "handle="); ok {
		handle, err := attest.ParsePersistentHandle(h)
		if err != nil {
			return err
		}
		return attest.PersistIdentityKey(ctx, t.tpm, k, handle)
	}
	tmp := rest + ".new"
	os.Remove(tmp) // a leftover of a cut write: never a key in use
	if err := attest.WriteKeyfile(tmp, k); err != nil {
		return err
	}
	if err := os.Rename(tmp, rest); err != nil {
		os.Remove(tmp)
		return fmt.Errorf("cannot keep the identity key: %w", err)
	}
	return nil
}

// Binding is what the state is bound to: "tpm:" and the SHA-256 of the EK's public area in
// upper-case hex. Another TPM (a board swapped) registers anew.
func (t *TPMIdentity) Binding() string {
	sum := t.EK.PublicSHA256()
	return "tpm:" + strings.ToUpper(hex.EncodeToString(sum[:]))
}

func (t *TPMIdentity) close() error {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.key == nil {
		return nil
	}
	err := t.key.Close()
	t.key = nil
	return err
}

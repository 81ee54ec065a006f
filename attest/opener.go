package attest

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha256"
	"crypto/x509"
	"fmt"
	"strings"
)

// Opener opens the TPM named by a spec when a key or a chain first needs it, so that software
// keys and PEM files need none, and keeps it open for the keys loaded through it until Close.
// A TPM that failed to open is not tried again: one wait on it is enough. It is the one way
// the agent and the commands open an identity.
type Opener struct {
	// ctx bounds the TPM's use, as OpenTPM's does.
	ctx  context.Context
	spec string
	tpm  *TPM
	err  error
}

// NewOpener returns an Opener of the TPM spec names (see OpenTPM); ctx ends every wait on
// it.
func NewOpener(ctx context.Context, spec string) *Opener {
	return &Opener{ctx: ctx, spec: spec}
}

// Spec is the TPM's spec as given.
func (o *Opener) Spec() string { return o.spec }

// TPM opens the TPM, or returns the one already open, or the error of the one attempt.
func (o *Opener) TPM() (*TPM, error) {
	if o.tpm == nil && o.err == nil {
		o.tpm, o.err = OpenTPM(o.ctx, o.spec)
	}
	return o.tpm, o.err
}

// TryAgain forgets why the TPM failed to open, so that its next use opens it again: for a
// program that waits for the TPM rather than giving up.
func (o *Opener) TryAgain() {
	if o.tpm == nil {
		o.err = nil
	}
}

// LoadKey loads the key spec names (see LoadKey), opening the TPM unless it is a file: key.
func (o *Opener) LoadKey(spec string) (*Key, error) {
	if strings.HasPrefix(spec, keySpecFile) {
		return LoadKey(nil, spec)
	}
	tpm, err := o.TPM()
	if err != nil {
		return nil, err
	}
	return LoadKey(tpm, spec)
}

// LoadChain loads the chain spec names (see LoadChain), opening the TPM for a tpm-nv: one.
func (o *Opener) LoadChain(spec string) ([]*x509.Certificate, error) {
	if !strings.HasPrefix(spec, certSpecNV) {
		return LoadChain(nil, spec)
	}
	tpm, err := o.TPM()
	if err != nil {
		return nil, err
	}
	return LoadChain(tpm, spec)
}

// Close closes the TPM if it was opened.
func (o *Opener) Close() error {
	if o.tpm == nil {
		return nil
	}
	return o.tpm.Close()
}

// ProveKey signs with signer and verifies the signature with cert's public key: the proof
// that the key is the certificate's, whatever the TPM did (MatchKey compares public keys
// only). A signature that does not verify is ErrKeyMismatch.
func ProveKey(signer crypto.Signer, cert *x509.Certificate) error {
	digest := sha256.Sum256([]byte("unicity end-of-line check"))
	sig, err := signer.Sign(rand.Reader, digest[:], crypto.SHA256)
	if err != nil {
		return err
	}
	ok := false
	switch pub := cert.PublicKey.(type) {
	case *ecdsa.PublicKey:
		ok = ecdsa.VerifyASN1(pub, digest[:], sig)
	case *rsa.PublicKey:
		ok = rsa.VerifyPKCS1v15(pub, crypto.SHA256, digest[:], sig) == nil
	}
	if !ok {
		return fmt.Errorf("%w: a signature by the key does not verify with the certificate", ErrKeyMismatch)
	}
	return nil
}

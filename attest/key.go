package attest

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rsa"
	"errors"
	"fmt"
	"io"
	"os"
	"strconv"
	"strings"
	"sync"

	keyfile "github.com/foxboron/go-tpm-keyfiles"
	"github.com/google/go-tpm/tpm2"
	"github.com/google/go-tpm/tpm2/transport"

	"github.com/unicity-iot/unicity/internal/certcodec"
)

// ErrInvalidKey means the configured key cannot be used: a malformed spec, an unreadable or
// foreign keyfile, an empty persistent handle, or a key type the agent does not sign with.
var ErrInvalidKey = errors.New("invalid device key")

// KeySpec prefixes of the configuration's identity_key.
const (
	keySpecTPM    = "tpmkey:"
	keySpecHandle = "tpmkey:handle="
	keySpecFile   = "file:"
)

// Key is the device key as a crypto.Signer. A TPM key stays loaded, so each signature costs
// one TPM command, unless it was flushed to make room for another (evictFor): it then loads
// again before its next signature. Sign is safe for concurrent use and Close flushes what the
// Key loaded.
type Key struct {
	// Location is where the key lives, as the configuration names it (for `identity`).
	Location string
	// Software is set for file: keys, which are for development only: their private key
	// is readable on disk. Callers warn about it.
	Software bool

	pub    crypto.PublicKey
	signer crypto.Signer
	// keyfile reloads a keyfile key after a TPM reset (swtpm restarted) dropped its handle.
	keyfile *keyfile.TPMKey
	loadedKey
}

// loadedKey is what every key held in the TPM shares: the TPM, the transient handle this
// process must flush, and the lock that keeps a use from racing Close.
type loadedKey struct {
	tpm   transport.TPM
	flush tpm2.TPMHandle // transient handle to flush on Close; 0 for none (a persistent key)

	mu     sync.RWMutex // uses hold it shared; Close exclusively, so no use meets a flushed handle
	closed bool
}

// Close flushes the key from the TPM (a persistent key stays). It does not close the TPM.
func (k *loadedKey) Close() error {
	k.mu.Lock()
	defer k.mu.Unlock()
	if k.closed {
		return nil
	}
	k.closed = true
	if k.flush == 0 {
		return nil
	}
	defer release(k.tpm, k.flush)
	if _, err := (tpm2.FlushContext{FlushHandle: k.flush}).Execute(k.tpm); err != nil {
		return fmt.Errorf("cannot flush key handle %#x: %w", uint32(k.flush), err)
	}
	return nil
}

var _ crypto.Signer = (*Key)(nil)

// ErrKeyClosed is returned by Sign after Close.
var ErrKeyClosed = errors.New("device key is closed")

// LoadKey loads the key named by spec: "tpmkey:/path/to/keyfile" (TSS2 PEM keyfile, also
// accepted as a bare path), "tpmkey:handle=0x81000002" (persistent TPM handle) or
// "file:/path" (software PEM key). tpm may be nil for file: keys.
func LoadKey(tpm transport.TPMCloser, spec string) (*Key, error) {
	switch {
	case strings.HasPrefix(spec, keySpecHandle):
		h, err := ParsePersistentHandle(strings.TrimPrefix(spec, keySpecHandle))
		if err != nil {
			return nil, err
		}
		if tpm == nil {
			return nil, fmt.Errorf("%w: %s needs a TPM", ErrNoTPM, spec)
		}
		return loadPersistent(tpm, h, spec)
	case strings.HasPrefix(spec, keySpecFile):
		return loadSoftware(strings.TrimPrefix(spec, keySpecFile), spec)
	case spec == "":
		return nil, fmt.Errorf("%w: no key configured", ErrInvalidKey)
	}
	path := strings.TrimPrefix(spec, keySpecTPM)
	if tpm == nil {
		return nil, fmt.Errorf("%w: %s needs a TPM", ErrNoTPM, spec)
	}
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("%w: %w", ErrInvalidKey, err)
	}
	k, err := keyfile.Decode(b)
	if err != nil {
		return nil, fmt.Errorf("%w: %s is not a TSS2 keyfile: %w", ErrInvalidKey, path, err)
	}
	key, err := loadKeyfile(tpm, k)
	if err != nil {
		return nil, fmt.Errorf("cannot load key %s: %w", path, err)
	}
	key.Location = keySpecTPM + path
	key.keyfile = k
	idleKey(tpm, key)
	return key, nil
}

// Close flushes the key from the TPM (a persistent key stays). It does not close the TPM.
func (k *Key) Close() error {
	if k.keyfile != nil {
		forgetKey(k.tpm, k)
	}
	return k.loadedKey.Close()
}

// evict flushes a keyfile key from the TPM, to make room, unless a signature is using it; the
// next signature loads it again (Sign). It reports whether it flushed it.
func (k *Key) evict() bool {
	if !k.mu.TryLock() {
		return false
	}
	defer k.mu.Unlock()
	if k.closed || k.signer == nil || k.flush == 0 {
		return false
	}
	if _, err := (tpm2.FlushContext{FlushHandle: k.flush}).Execute(k.tpm); err != nil {
		return false
	}
	release(k.tpm, k.flush)
	k.signer, k.flush = nil, 0
	return true
}

// ParsePersistentHandle parses a persistent TPM handle (0x81000000-0x81FFFFFF) such as
// "0x81000002".
func ParsePersistentHandle(s string) (tpm2.TPMHandle, error) {
	v, err := strconv.ParseUint(s, 0, 32)
	if err != nil || v>>24 != 0x81 {
		return 0, fmt.Errorf("%w: persistent handle %q: want 0x81000000 to 0x81FFFFFF", ErrInvalidKey, s)
	}
	return tpm2.TPMHandle(v), nil
}

// publicKey parses a TPM public area without the panics of keyfile's helpers.
func publicKey(pub tpm2.TPM2BPublic) (*tpm2.TPMTPublic, crypto.PublicKey, error) {
	contents, err := pub.Contents()
	if err != nil {
		return nil, nil, fmt.Errorf("%w: unreadable public area: %w", ErrInvalidKey, err)
	}
	if !contents.ObjectAttributes.SignEncrypt || contents.ObjectAttributes.Restricted {
		return nil, nil, fmt.Errorf("%w: not an unrestricted signing key", ErrInvalidKey)
	}
	pk, err := tpm2.Pub(*contents)
	if err != nil {
		return nil, nil, fmt.Errorf("%w: %w", ErrInvalidKey, err)
	}
	if err := checkKeyType(pk); err != nil {
		return nil, nil, err
	}
	return contents, pk, nil
}

// checkKeyType admits the keys DPS and IoT Hub accept and the TPM signs for TLS.
func checkKeyType(pk crypto.PublicKey) error {
	switch pk := pk.(type) {
	case *ecdsa.PublicKey:
		if pk.Curve == elliptic.P256() || pk.Curve == elliptic.P384() {
			return nil
		}
	case *rsa.PublicKey:
		if pk.Size() == 256 {
			return nil
		}
	}
	return fmt.Errorf("%w: key type %T is not ECDSA P-256, P-384 or RSA-2048", ErrInvalidKey, pk)
}

func loadKeyfile(tpm transport.TPMCloser, k *keyfile.TPMKey) (*Key, error) {
	if !k.Keytype.Equal(keyfile.OIDLoadableKey) {
		return nil, fmt.Errorf("%w: keyfile type %v is not a loadable key", ErrInvalidKey, k.Keytype)
	}
	contents, pk, err := publicKey(k.Pubkey)
	if err != nil {
		return nil, err
	}
	if !keyfile.IsMSO(k.Parent, keyfile.TPM_HT_PERMANENT) && !keyfile.IsMSO(k.Parent, keyfile.TPM_HT_PERSISTENT) {
		return nil, fmt.Errorf("%w: keyfile parent %#x is neither a hierarchy nor a persistent key", ErrInvalidKey, uint32(k.Parent))
	}
	var key *Key
	err = inSequence(tpm, func() error {
		kh, err := loadUnderParent(tpm, k)
		// On a TPM with no resource manager, the slots may be taken by objects of programs
		// that are gone (a killed agent's key): flushed, they are free for this one. Else
		// this program's idle keyfile keys make room, to be loaded again when used.
		if outOfMemory(err) && (reclaimFor(tpm) || evictFor(tpm, nil)) {
			kh, err = loadUnderParent(tpm, k)
		}
		if err != nil {
			return err
		}
		key = newTPMKey(tpm, *kh, contents, pk, kh.Handle) // held before another sequence may reclaim
		return nil
	})
	return key, err
}

func outOfMemory(err error) bool {
	return errors.Is(err, tpm2.TPMRCObjectMemory) || errors.Is(err, tpm2.TPMRCSessionMemory) || errors.Is(err, tpm2.TPMRCMemory)
}

// loadUnderParent loads k under its parent and flushes the parent if it is transient.
//
// Each step by hand rather than through keyfile.LoadKey, which leaks the transient SRK when
// Load fails and keeps only the text of the TPM's errors, so that a TPM that is busy or gone
// could not be told from one that refuses the keyfile.
func loadUnderParent(tpm transport.TPMCloser, k *keyfile.TPMKey) (*tpm2.AuthHandle, error) {
	parent, salt, err := loadParent(tpm, k.Parent)
	if err != nil {
		return nil, err
	}
	// Salted and encrypted, as tpm2-tss loads keyfiles, so the bus sees no key material.
	sess := tpm2.HMAC(tpm2.TPMAlgSHA256, 16, tpm2.AESEncryption(128, tpm2.EncryptInOut), salt)
	lr, err := tpm2.Load{ParentHandle: parent, InPrivate: k.Privkey, InPublic: k.Pubkey}.Execute(tpm, sess)
	if keyfile.IsMSO(parent.Handle, keyfile.TPM_HT_TRANSIENT) {
		tpm2.FlushContext{FlushHandle: parent.Handle}.Execute(tpm)
	}
	switch {
	case outOfMemory(err):
		return nil, fmt.Errorf("%w: the TPM is out of memory (another program holds its slots?): %w", ErrTPMUnavailable, err)
	case tpmRefused(err):
		return nil, fmt.Errorf("%w: the TPM refused the keyfile (made on another TPM, or under another parent?): %w", ErrInvalidKey, err)
	case err != nil:
		return nil, fmt.Errorf("%w: cannot load the keyfile: %w", ErrTPMUnavailable, err)
	}
	return &tpm2.AuthHandle{Handle: lr.ObjectHandle, Name: lr.Name, Auth: tpm2.PasswordAuth(nil)}, nil
}

// loadParent makes a keyfile's parent usable: for a hierarchy, the H-2 storage root key that
// tpm2-tss derives (transient: the caller flushes it); otherwise the persistent key. It also
// returns the salt for the session that loads the key under it.
func loadParent(tpm transport.TPM, parent tpm2.TPMHandle) (tpm2.AuthHandle, tpm2.AuthOption, error) {
	if keyfile.IsMSO(parent, keyfile.TPM_HT_PERMANENT) {
		srk, err := createSRK(tpm, parent)
		if err != nil {
			return tpm2.AuthHandle{}, nil, fmt.Errorf("%w: %w", tpmErrorKind(err, ErrInvalidKey), err)
		}
		pub, err := srk.OutPublic.Contents()
		if err != nil {
			tpm2.FlushContext{FlushHandle: srk.ObjectHandle}.Execute(tpm)
			return tpm2.AuthHandle{}, nil, fmt.Errorf("%w: unreadable storage root key: %w", ErrTPMUnavailable, err)
		}
		return tpm2.AuthHandle{Handle: srk.ObjectHandle, Name: srk.Name, Auth: tpm2.PasswordAuth(nil)}, tpm2.Salted(srk.ObjectHandle, *pub), nil
	}
	rp, err := tpm2.ReadPublic{ObjectHandle: parent}.Execute(tpm)
	if err != nil {
		return tpm2.AuthHandle{}, nil, fmt.Errorf("%w: the keyfile's parent %#x: %w", tpmErrorKind(err, ErrInvalidKey), uint32(parent), err)
	}
	pub, err := rp.OutPublic.Contents()
	if err != nil {
		return tpm2.AuthHandle{}, nil, fmt.Errorf("%w: the keyfile's parent %#x: %w", ErrInvalidKey, uint32(parent), err)
	}
	return tpm2.AuthHandle{Handle: parent, Name: rp.Name, Auth: tpm2.PasswordAuth(nil)}, tpm2.Salted(parent, *pub), nil
}

func loadPersistent(tpm transport.TPMCloser, h tpm2.TPMHandle, spec string) (*Key, error) {
	rp, err := tpm2.ReadPublic{ObjectHandle: h}.Execute(tpm)
	if err != nil {
		return nil, fmt.Errorf("%w: no key at handle %#x: %w", tpmErrorKind(err, ErrInvalidKey), uint32(h), err)
	}
	contents, pk, err := publicKey(rp.OutPublic)
	if err != nil {
		return nil, fmt.Errorf("handle %#x: %w", uint32(h), err)
	}
	key := newTPMKey(tpm, tpm2.AuthHandle{Handle: h, Name: rp.Name, Auth: tpm2.PasswordAuth(nil)}, contents, pk, 0)
	key.Location = spec
	return key, nil
}

func newTPMKey(tpm transport.TPMCloser, h tpm2.AuthHandle, contents *tpm2.TPMTPublic, pk crypto.PublicKey, flush tpm2.TPMHandle) *Key {
	size := 0
	if rk, ok := pk.(*rsa.PublicKey); ok {
		size = rk.Size()
	}
	hs := keyfile.NewTPMHandleSigner(tpm, pk, contents.Type, size, h)
	hold(tpm, flush)
	return &Key{pub: pk, signer: &hs, loadedKey: loadedKey{tpm: tpm, flush: flush}}
}

func loadSoftware(path, spec string) (*Key, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("%w: %w", ErrInvalidKey, err)
	}
	s, err := certcodec.ParsePrivateKey(b)
	if err != nil {
		return nil, fmt.Errorf("%w: %s: %w", ErrInvalidKey, path, err)
	}
	if err := checkKeyType(s.Public()); err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	return &Key{Location: spec, Software: true, pub: s.Public(), signer: s}, nil
}

// Public returns the key's public half: *ecdsa.PublicKey or *rsa.PublicKey.
func (k *Key) Public() crypto.PublicKey { return k.pub }

// Sign signs digest, a SHA-256 or SHA-384 hash (ASN.1 DER for ECDSA; PKCS #1 v1.5, or PSS
// with the salt as long as the hash, for RSA). The TPM is asked only once the arguments are
// known to be right.
func (k *Key) Sign(rand io.Reader, digest []byte, opts crypto.SignerOpts) ([]byte, error) {
	h := opts.HashFunc()
	switch h {
	case crypto.SHA256, crypto.SHA384:
	default:
		// SHA-512 with RSA would need the key's decrypt attribute, which sign-only keys lack.
		return nil, fmt.Errorf("cannot sign: hash %v is not SHA-256 or SHA-384", h)
	}
	if len(digest) != h.Size() {
		return nil, fmt.Errorf("cannot sign: digest is %d bytes, %v needs %d", len(digest), h, h.Size())
	}
	if pss, ok := opts.(*rsa.PSSOptions); ok {
		if _, isRSA := k.pub.(*rsa.PublicKey); !isRSA {
			return nil, errors.New("cannot sign: RSA-PSS requested for a non-RSA key")
		}
		// A TPM makes PSS signatures with the salt as long as the hash, nothing else.
		if pss.SaltLength != rsa.PSSSaltLengthEqualsHash && pss.SaltLength != rsa.PSSSaltLengthAuto && pss.SaltLength != h.Size() {
			return nil, fmt.Errorf("cannot sign: PSS salt length %d is not the hash length", pss.SaltLength)
		}
	}
	sig, used, err := k.signLoaded(rand, digest, opts)
	if k.keyfile != nil && err != nil && !errors.Is(err, ErrKeyClosed) {
		// Flushed to make room (evictFor), or the TPM was reset under us (swtpm restarted):
		// its transient handle is gone, but the keyfile loads again. Only once: a TPM that
		// refuses it stays an error.
		if rerr := k.reload(used); rerr == nil {
			sig, _, err = k.signLoaded(rand, digest, opts)
		} else if errors.Is(err, errUnloaded) {
			err = rerr
		}
	}
	if err != nil {
		return nil, fmt.Errorf("cannot sign with %s: %w", k.Location, err)
	}
	return sig, nil
}

// errUnloaded: the keyfile key was flushed to make room, and loads again before it signs.
var errUnloaded = errors.New("the key is not loaded")

// signLoaded signs with the key as loaded now, unless Close has begun: Close and evict wait
// for it, so no signature uses a flushed handle (whose number another object may have
// taken). used is the signer it used, for reload.
func (k *Key) signLoaded(rand io.Reader, digest []byte, opts crypto.SignerOpts) (sig []byte, used crypto.Signer, err error) {
	k.mu.RLock()
	defer k.mu.RUnlock()
	switch {
	case k.closed:
		return nil, nil, ErrKeyClosed
	case k.signer == nil:
		return nil, nil, errUnloaded
	}
	sig, err = k.signer.Sign(rand, digest, opts)
	return sig, k.signer, err
}

// reload loads the keyfile again in place of failed, unless another Sign already did.
func (k *Key) reload(failed crypto.Signer) error {
	k.mu.Lock()
	defer k.mu.Unlock()
	if k.closed {
		return ErrKeyClosed
	}
	if k.signer != failed {
		return nil
	}
	fresh, err := loadKeyfile(k.tpm.(transport.TPMCloser), k.keyfile)
	if err != nil {
		return err
	}
	// The old handle is flushed if the TPM still has it; after a reset it is gone, and its
	// number may be the fresh key's.
	if k.flush != 0 && k.flush != fresh.flush {
		tpm2.FlushContext{FlushHandle: k.flush}.Execute(k.tpm)
	}
	release(k.tpm, k.flush)
	k.signer, k.flush = fresh.signer, fresh.flush
	return nil
}

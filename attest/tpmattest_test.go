package attest_test

import (
	"context"
	"crypto/rand"
	"crypto/rsa"
	"encoding/binary"
	"errors"
	"path/filepath"
	"strconv"
	"sync"
	"testing"
	"time"

	"github.com/google/go-tpm/tpm2"
	"github.com/google/go-tpm/tpm2/transport"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/unicity-iot/unicity/attest"
	"github.com/unicity-iot/unicity/attest/attesttest"
	"github.com/unicity-iot/unicity/dps/dpstest"
	"github.com/unicity-iot/unicity/sas"
)

// The software key of symmetric-key attestation and the TPM's identity key sign alike.
var (
	_ sas.Signer = attest.SymmetricKey(nil)
	_ sas.Signer = (*attest.HMACKey)(nil)
)

// tpmSAS is a SAS token whose signature the TPM makes with key.
func tpmSAS(t testing.TB, key sas.Signer, resource string, expiry time.Time, keyName string) string {
	t.Helper()
	tok, err := sas.SignedToken(context.Background(), key, resource, expiry, keyName)
	require.NoError(t, err)
	return tok
}

// device is a TPM's side of TPM attestation, up to the identity key.
type device struct {
	ek  *attest.EndorsementKey
	srk *attest.StorageRootKey
}

func newDevice(t testing.TB, tpm transport.TPM, srkHandle tpm2.TPMHandle) device {
	t.Helper()
	ctx := context.Background()
	ek, err := attest.ReadEndorsementKey(ctx, tpm)
	require.NoError(t, err)
	srk, err := attest.OpenSRK(ctx, tpm, srkHandle)
	require.NoError(t, err)
	return device{ek, srk}
}

// importKey answers challenge and loads the identity key, kept in a keyfile (persist 0) or
// persisted at handle persist.
func (d device) importKey(t testing.TB, tpm transport.TPM, challenge *dpstest.TPMChallenge, persist tpm2.TPMHandle) *attest.HMACKey {
	t.Helper()
	ctx := context.Background()
	kf, err := attest.ImportIdentityKey(ctx, tpm, d.ek, d.srk, challenge.AuthenticationKey)
	require.NoError(t, err)
	spec := "tpmkey:handle=0x" + strconv.FormatUint(uint64(persist), 16)
	if persist == 0 {
		spec = "tpmkey:" + filepath.Join(t.TempDir(), "identity.key")
		require.NoError(t, attest.WriteKeyfile(spec[len("tpmkey:"):], kf))
	} else {
		require.NoError(t, attest.PersistIdentityKey(ctx, tpm, kf, persist))
	}
	key, err := attest.LoadHMACKey(ctx, tpm, spec)
	require.NoError(t, err)
	t.Cleanup(func() { key.Close() })
	return key
}

// assertSignsFor checks that the TPM's key makes the very tokens DPS and the hub expect
// from the identity key DPS made.
func assertSignsFor(t testing.TB, key *attest.HMACKey, identityKey []byte, regID string) {
	t.Helper()
	exp := time.Now().Add(time.Hour)
	dpsResource := "0ne00000001/registrations/" + regID
	assert.Equal(t, sas.Token(identityKey, dpsResource, exp, "registration"), tpmSAS(t, key, dpsResource, exp, "registration"))
	hubResource := "hub-1.azure-devices.net/devices/" + regID
	assert.Equal(t, sas.Token(identityKey, hubResource, exp, ""), tpmSAS(t, key, hubResource, exp, ""))
}

// TestTPMAttestationRoundTrip: the challenge DPS builds from the EK and SRK the device
// reports is answered inside the TPM, and the imported key signs the SAS tokens DPS checks
// with the key it made; kept in a keyfile or persisted, and nothing stays loaded.
func TestTPMAttestationRoundTrip(t *testing.T) {
	for _, tp := range tpms {
		for _, persist := range []tpm2.TPMHandle{0, attest.DefaultIdentityKeyHandle} {
			name := tp.name + "/keyfile"
			if persist != 0 {
				name = tp.name + "/persistent"
			}
			t.Run(name, func(t *testing.T) {
				tpm := tp.open(t)
				before := attesttest.LoadedHandles(t, tpm)
				d := newDevice(t, tpm, 0)
				assert.True(t, d.srk.Created, "a blank TPM has no SRK: it is made and said so")
				assert.Equal(t, attest.DefaultSRKHandle, d.srk.Handle)
				assert.Zero(t, d.ek.Handle, "a blank TPM has no persistent EK: it is made from the template")
				regID := d.ek.RegistrationID()
				assert.Len(t, regID, 52)
				require.NoError(t, attest.ValidRegistrationID(regID))

				again := newDevice(t, tpm, 0)
				assert.False(t, again.srk.Created, "the persisted SRK is found the next time")
				assert.Equal(t, d.srk.Public, again.srk.Public)
				assert.Equal(t, d.ek.Public, again.ek.Public, "the EK made again is the same key")

				challenge, err := dpstest.NewTPMChallenge(d.ek.Public, d.srk.Public)
				require.NoError(t, err)
				key := d.importKey(t, tpm, challenge, persist)
				assertSignsFor(t, key, challenge.IdentityKey, regID)
				require.NoError(t, key.Close())
				_, err = key.Sign(context.Background(), []byte("x"))
				require.ErrorIs(t, err, attest.ErrKeyClosed)
				assert.Equal(t, before, attesttest.LoadedHandles(t, tpm), "every object and session was flushed")

				if persist != 0 {
					// Registering again (a new challenge) replaces the identity key in place.
					second, err := dpstest.NewTPMChallenge(d.ek.Public, d.srk.Public)
					require.NoError(t, err)
					key := d.importKey(t, tpm, second, persist)
					assertSignsFor(t, key, second.IdentityKey, regID)
					assert.Equal(t, before, attesttest.LoadedHandles(t, tpm))
				}
			})
		}
	}
}

// anotherTPMKey is the public area of a key like tpm's EK or SRK (template), but of another
// TPM: another RSA key.
func anotherTPMKey(t testing.TB, template tpm2.TPMTPublic) []byte {
	t.Helper()
	k, err := rsa.GenerateKey(rand.Reader, 2048)
	require.NoError(t, err)
	template.Unique = tpm2.NewTPMUPublicID(tpm2.TPMAlgRSA, &tpm2.TPM2BPublicKeyRSA{Buffer: k.N.Bytes()})
	return tpm2.Marshal(tpm2.New2B(template))
}

// TestTPMAttestationWrongTPM: a challenge made for another TPM's EK or SRK (an enrollment
// naming another device) is refused by the TPM with ErrNotThisTPM, which the agent reports
// as refused (77); a garbled one never reaches the TPM. Nothing leaks either way.
func TestTPMAttestationWrongTPM(t *testing.T) {
	for _, tp := range tpms {
		t.Run(tp.name, func(t *testing.T) {
			tpm := tp.open(t)
			d := newDevice(t, tpm, 0)
			before := attesttest.LoadedHandles(t, tpm)
			ctx := context.Background()
			for name, keys := range map[string][2][]byte{
				"another EK":  {anotherTPMKey(t, tpm2.RSAEKTemplate), d.srk.Public},
				"another SRK": {d.ek.Public, anotherTPMKey(t, tpm2.RSASRKTemplate)},
			} {
				challenge, err := dpstest.NewTPMChallenge(keys[0], keys[1])
				require.NoError(t, err)
				_, err = attest.ImportIdentityKey(ctx, tpm, d.ek, d.srk, challenge.AuthenticationKey)
				require.ErrorIs(t, err, attest.ErrNotThisTPM, name)
				assert.NotErrorIs(t, err, attest.ErrTPMUnavailable, name)
				assert.Equal(t, before, attesttest.LoadedHandles(t, tpm), name)
			}

			challenge, err := dpstest.NewTPMChallenge(d.ek.Public, d.srk.Public)
			require.NoError(t, err)
			counted := &countingTPM{TPMCloser: tpm}
			_, err = attest.ImportIdentityKey(ctx, counted, d.ek, d.srk, challenge.AuthenticationKey[:len(challenge.AuthenticationKey)-1])
			require.ErrorIs(t, err, attest.ErrInvalidChallenge)
			assert.Zero(t, counted.commands, "a garbled challenge is refused before the TPM")
		})
	}
}

// TestSRKTypes: DPS takes an RSA SRK. An ECC SRK at 0x81000001 (systemd's) is left alone
// and refused with ErrSRKOccupied, and attestation works with an RSA SRK at another handle;
// an RSA SRK already there (as the C SDK makes it) is reused. The emulator refuses an ECC
// SRK as DPS's clients never send one.
func TestSRKTypes(t *testing.T) {
	for _, tp := range tpms {
		t.Run(tp.name, func(t *testing.T) {
			tpm := tp.open(t)
			ctx := context.Background()
			persistPrimary(t, tpm, tpm2.ECCSRKTemplate, attest.DefaultSRKHandle)
			systemd := must(tpm2.ReadPublic{ObjectHandle: attest.DefaultSRKHandle}.Execute(tpm))

			_, err := attest.OpenSRK(ctx, tpm, attest.DefaultSRKHandle)
			require.ErrorIs(t, err, attest.ErrSRKOccupied)
			assert.Contains(t, err.Error(), "ECC")
			assert.Contains(t, err.Error(), "0x81000002", "the error names a handle to use instead")
			still := must(tpm2.ReadPublic{ObjectHandle: attest.DefaultSRKHandle}.Execute(tpm))
			assert.Equal(t, systemd.Name, still.Name, "systemd's SRK is untouched")

			d := newDevice(t, tpm, 0x81000002)
			assert.True(t, d.srk.Created)
			_, err = dpstest.NewTPMChallenge(d.ek.Public, tpm2.Marshal(systemd.OutPublic))
			require.ErrorIs(t, err, dpstest.ErrBadTPMKey, "DPS takes no ECC SRK")
			challenge, err := dpstest.NewTPMChallenge(d.ek.Public, d.srk.Public)
			require.NoError(t, err)
			assertSignsFor(t, d.importKey(t, tpm, challenge, 0), challenge.IdentityKey, d.ek.RegistrationID())
		})
	}
	t.Run("RSA SRK reused", func(t *testing.T) {
		tpm := tpms[0].open(t)
		// The C and Node SDKs' SRK template: the TCG one with an empty unique field.
		cSDK := tpm2.RSASRKTemplate
		cSDK.Unique = tpm2.NewTPMUPublicID(tpm2.TPMAlgRSA, &tpm2.TPM2BPublicKeyRSA{})
		persistPrimary(t, tpm, cSDK, attest.DefaultSRKHandle)
		existing := must(tpm2.ReadPublic{ObjectHandle: attest.DefaultSRKHandle}.Execute(tpm))

		d := newDevice(t, tpm, 0)
		assert.False(t, d.srk.Created)
		assert.Equal(t, tpm2.Marshal(existing.OutPublic), d.srk.Public)
		challenge, err := dpstest.NewTPMChallenge(d.ek.Public, d.srk.Public)
		require.NoError(t, err)
		assertSignsFor(t, d.importKey(t, tpm, challenge, attest.DefaultIdentityKeyHandle), challenge.IdentityKey, d.ek.RegistrationID())
	})
}

// persistPrimary makes a primary key of the owner hierarchy from template at handle h.
func persistPrimary(t testing.TB, tpm transport.TPM, template tpm2.TPMTPublic, h tpm2.TPMHandle) {
	t.Helper()
	cp, err := tpm2.CreatePrimary{PrimaryHandle: tpm2.TPMRHOwner, InPublic: tpm2.New2B(template)}.Execute(tpm)
	require.NoError(t, err)
	defer tpm2.FlushContext{FlushHandle: cp.ObjectHandle}.Execute(tpm)
	_, err = tpm2.EvictControl{
		Auth:             tpm2.TPMRHOwner,
		ObjectHandle:     &tpm2.NamedHandle{Handle: cp.ObjectHandle, Name: cp.Name},
		PersistentHandle: h,
	}.Execute(tpm)
	require.NoError(t, err)
}

// TestIdentityKeyHandleOccupied: persisting refuses to replace an object that is not an
// identity key.
func TestIdentityKeyHandleOccupied(t *testing.T) {
	tpm := tpms[0].open(t)
	ctx := context.Background()
	d := newDevice(t, tpm, 0)
	challenge, err := dpstest.NewTPMChallenge(d.ek.Public, d.srk.Public)
	require.NoError(t, err)
	kf, err := attest.ImportIdentityKey(ctx, tpm, d.ek, d.srk, challenge.AuthenticationKey)
	require.NoError(t, err)
	require.ErrorIs(t, attest.PersistIdentityKey(ctx, tpm, kf, d.srk.Handle), attest.ErrKeyExists)
	_, err = attest.LoadHMACKey(ctx, tpm, "tpmkey:handle=0x81000001")
	require.ErrorIs(t, err, attest.ErrInvalidKey, "the SRK is no HMAC key")
	_, err = attest.LoadHMACKey(ctx, tpm, "tpmkey:handle=0x81000100")
	require.ErrorIs(t, err, attest.ErrInvalidKey, "nothing persisted there")
}

// TestHMACKeyLeavesNoHandle: 1,000 SAS signatures (the hub tokens of a long life) leave the
// TPM holding what it held before, a loaded keyfile key only until Close.
func TestHMACKeyLeavesNoHandle(t *testing.T) {
	for _, tp := range tpms {
		for _, persist := range []tpm2.TPMHandle{0, attest.DefaultIdentityKeyHandle} {
			t.Run(tp.name+"/"+strconv.FormatBool(persist != 0), func(t *testing.T) {
				tpm := tp.open(t)
				d := newDevice(t, tpm, 0)
				challenge, err := dpstest.NewTPMChallenge(d.ek.Public, d.srk.Public)
				require.NoError(t, err)
				before := attesttest.LoadedHandles(t, tpm)
				key := d.importKey(t, tpm, challenge, persist)
				loaded := attesttest.LoadedHandles(t, tpm)
				want := len(before)
				if persist == 0 {
					want++
				}
				require.Len(t, loaded, want, "only the keyfile's key itself stays loaded")
				exp := time.Now().Add(time.Hour)
				for i := range 1000 {
					resource := "hub-1.azure-devices.net/devices/" + strconv.Itoa(i)
					require.Equal(t, sas.Token(challenge.IdentityKey, resource, exp, ""), tpmSAS(t, key, resource, exp, ""))
				}
				assert.Equal(t, loaded, attesttest.LoadedHandles(t, tpm))
				require.NoError(t, key.Close())
				assert.Equal(t, before, attesttest.LoadedHandles(t, tpm))
			})
		}
	}
}

func TestHMACKeyRefusesLongData(t *testing.T) {
	tpm := tpms[0].open(t)
	d := newDevice(t, tpm, 0)
	challenge, err := dpstest.NewTPMChallenge(d.ek.Public, d.srk.Public)
	require.NoError(t, err)
	key := d.importKey(t, tpm, challenge, 0)
	_, err = key.Sign(context.Background(), make([]byte, 1025))
	require.ErrorContains(t, err, "at most 1024")
	sig, err := key.Sign(context.Background(), make([]byte, 1024))
	require.NoError(t, err)
	want, _ := attest.SymmetricKey(challenge.IdentityKey).Sign(context.Background(), make([]byte, 1024))
	assert.Equal(t, want, sig)
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	_, err = key.Sign(ctx, []byte("x"))
	require.ErrorIs(t, err, context.Canceled)
}

// TestRegistrationID pins the derivation on a fixed public area. The expected value was
// computed apart from Go:
// printf '%s' "$EK_PUBLIC_HEX" | xxd -r -p | sha256sum | cut -c1-64 | xxd -r -p | base32 | tr -d = | tr A-Z a-z
func TestRegistrationID(t *testing.T) {
	ek := attest.EndorsementKey{Public: tpm2.Marshal(tpm2.New2B(tpm2.RSAEKTemplate))}
	assert.Equal(t, "un4jahv4cdr7rgz3jczknzja3jgon43u6fxovm6zss4tix2xjmoq", ek.RegistrationID())
}

// countingTPM counts the commands sent through it.
type countingTPM struct {
	transport.TPMCloser
	commands int
}

func (c *countingTPM) Send(cmd []byte) ([]byte, error) {
	c.commands++
	return c.TPMCloser.Send(cmd)
}

// failureModeTPM is a TPM gone into failure mode at its first command with code cc: from
// then on it answers every command but GetCapability with TPM_RC_FAILURE.
type failureModeTPM struct {
	transport.TPMCloser
	cc     tpm2.TPMCC
	broken bool
}

func (f *failureModeTPM) Send(cmd []byte) ([]byte, error) {
	cc := tpm2.TPMCC(binary.BigEndian.Uint32(cmd[6:10]))
	f.broken = f.broken || cc == f.cc
	if !f.broken || cc == tpm2.TPMCCGetCapability {
		return f.TPMCloser.Send(cmd)
	}
	return (&failingTPM{cc: cc, rc: tpm2.TPMRCFailure}).Send(cmd)
}

// TestBusyTPMDuringAttestation: a TPM that answers "later" or stops answering at any step of
// the attestation is unavailable (the agent retries), not a challenge for another TPM; and
// nothing stays loaded.
func TestBusyTPMDuringAttestation(t *testing.T) {
	tpm := attesttest.Simulator(t)
	ctx := context.Background()
	d := newDevice(t, tpm, 0)
	challenge, err := dpstest.NewTPMChallenge(d.ek.Public, d.srk.Public)
	require.NoError(t, err)
	attestation := func(tpm transport.TPMCloser) error {
		kf, err := attest.ImportIdentityKey(ctx, tpm, d.ek, d.srk, challenge.AuthenticationKey)
		if err != nil {
			return err
		}
		path := filepath.Join(t.TempDir(), "identity.key")
		require.NoError(t, attest.WriteKeyfile(path, kf))
		key, err := attest.LoadHMACKey(ctx, tpm, path)
		if err != nil {
			return err
		}
		defer key.Close()
		_, err = key.Sign(ctx, []byte("0ne00000001%2Fregistrations%2Fx\n1"))
		return err
	}
	for _, c := range []struct {
		name string
		cc   tpm2.TPMCC
		rc   tpm2.TPMRC // zero: the connection breaks
	}{
		{"ek: retry", tpm2.TPMCCCreatePrimary, tpm2.TPMRCRetry},
		{"ek: connection broken", tpm2.TPMCCCreatePrimary, 0},
		{"session: out of session memory", tpm2.TPMCCStartAuthSession, tpm2.TPMRCSessionMemory},
		{"policy: yielded", tpm2.TPMCCPolicySecret, tpm2.TPMRCYielded},
		{"activate: lockout", tpm2.TPMCCActivateCredential, tpm2.TPMRCLockout},
		{"activate: connection broken", tpm2.TPMCCActivateCredential, 0},
		{"import: self-test running", tpm2.TPMCCImport, tpm2.TPMRCTesting},
		{"import: connection broken", tpm2.TPMCCImport, 0},
		{"load: out of object memory", tpm2.TPMCCLoad, tpm2.TPMRCObjectMemory},
		{"hmac: retry", tpm2.TPMCCHMAC, tpm2.TPMRCRetry},
	} {
		t.Run(c.name, func(t *testing.T) {
			before := attesttest.LoadedHandles(t, tpm)
			err := attestation(&failingTPM{TPMCloser: tpm, cc: c.cc, rc: c.rc})
			require.Error(t, err)
			assert.ErrorIs(t, err, attest.ErrTPMUnavailable)
			assert.NotErrorIs(t, err, attest.ErrNotThisTPM)
			assert.NotErrorIs(t, err, attest.ErrInvalidKey)
			assert.Equal(t, before, attesttest.LoadedHandles(t, tpm), "nothing left loaded")
			require.NoError(t, attestation(tpm), "the same TPM, answering, attests")
		})
	}
	t.Run("activate: failure mode", func(t *testing.T) {
		_, err := attest.ImportIdentityKey(ctx, &failureModeTPM{TPMCloser: tpm, cc: tpm2.TPMCCActivateCredential}, d.ek, d.srk, challenge.AuthenticationKey)
		assert.ErrorIs(t, err, attest.ErrTPMUnavailable)
		assert.NotErrorIs(t, err, attest.ErrNotThisTPM, "a TPM in failure mode refused nothing")
	})
}

// TestHMACKeyConcurrentSign: hub and DPS tokens may be signed at once, and Close may come
// in the middle: every signature is right or refused as closed, and nothing stays loaded.
func TestHMACKeyConcurrentSign(t *testing.T) {
	tpm := tpms[0].open(t)
	d := newDevice(t, tpm, 0)
	challenge, err := dpstest.NewTPMChallenge(d.ek.Public, d.srk.Public)
	require.NoError(t, err)
	before := attesttest.LoadedHandles(t, tpm)
	key := d.importKey(t, tpm, challenge, 0)
	signing := make(chan struct{})
	var once sync.Once
	var wg sync.WaitGroup
	for g := range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			defer once.Do(func() { close(signing) }) // a signer that stops early stops the wait
			for i := 0; ; i++ {
				data := []byte(strconv.Itoa(g) + "/" + strconv.Itoa(i))
				sig, err := key.Sign(context.Background(), data)
				if errors.Is(err, attest.ErrKeyClosed) {
					return
				}
				want, _ := attest.SymmetricKey(challenge.IdentityKey).Sign(context.Background(), data)
				if !assert.NoError(t, err) || !assert.Equal(t, want, sig) {
					return
				}
				if i == 20 {
					once.Do(func() { close(signing) })
				}
			}
		}()
	}
	<-signing
	require.NoError(t, key.Close())
	wg.Wait()
	assert.Equal(t, before, attesttest.LoadedHandles(t, tpm))
}

package attest_test

import (
	"crypto/rand"
	"crypto/rsa"
	"errors"
	"testing"

	"github.com/google/go-tpm/tpm2"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/unicity-iot/unicity/attest"
	"github.com/unicity-iot/unicity/dps/dpstest"
)

// softwareChallenge is a challenge as DPS builds it, for keys of no TPM: parsing needs none.
func softwareChallenge(t testing.TB) []byte {
	t.Helper()
	c, err := dpstest.NewTPMChallenge(anotherTPMKey(t, tpm2.RSAEKTemplate), anotherTPMKey(t, tpm2.RSASRKTemplate))
	require.NoError(t, err)
	return c.AuthenticationKey
}

func TestParseAuthenticationKey(t *testing.T) {
	good := softwareChallenge(t)
	ak, err := attest.ParseAuthenticationKey(good)
	require.NoError(t, err)
	assert.Nil(t, ak.Data)
	assert.Equal(t, good, ak.Marshal())
	for _, data := range [][]byte{{}, []byte("data to decrypt")} {
		with := *ak
		with.Data = data
		got, err := attest.ParseAuthenticationKey(with.Marshal())
		require.NoError(t, err, "a trailing TPM2B_DATA of %d bytes", len(data))
		assert.Equal(t, data, got.Data)
		assert.Equal(t, with.Marshal(), got.Marshal())
	}

	// Each of the first five structures, cut short at its size and in its middle.
	var ends []int
	off := 0
	for _, n := range []int{len(ak.Credential.Buffer), len(ak.CredentialSecret.Buffer), len(ak.Duplicate.Buffer), len(ak.ImportSecret.Buffer), len(ak.Public.Bytes())} {
		ends = append(ends, off)
		off += 2 + n
	}
	for i, start := range ends {
		for _, cut := range []int{start, start + 1, start + 5} {
			if cut == 0 {
				continue // the "empty" case below
			}
			_, err := attest.ParseAuthenticationKey(good[:cut])
			require.ErrorIs(t, err, attest.ErrInvalidChallenge, "cut at %d", cut)
			assert.ErrorContains(t, err, "structure "+string(rune('1'+i)))
		}
	}

	rsaKey, err := rsa.GenerateKey(rand.Reader, 2048)
	require.NoError(t, err)
	notHMAC := tpm2.RSAEKTemplate
	notHMAC.Unique = tpm2.NewTPMUPublicID(tpm2.TPMAlgRSA, &tpm2.TPM2BPublicKeyRSA{Buffer: rsaKey.N.Bytes()})
	pub, err := ak.Public.Contents()
	require.NoError(t, err)
	restricted := *pub
	restricted.ObjectAttributes.Restricted = true
	sha1 := *pub
	sha1.Parameters = tpm2.NewTPMUPublicParms(tpm2.TPMAlgKeyedHash, &tpm2.TPMSKeyedHashParms{Scheme: tpm2.TPMTKeyedHashScheme{
		Scheme: tpm2.TPMAlgHMAC, Details: tpm2.NewTPMUSchemeKeyedHash(tpm2.TPMAlgHMAC, &tpm2.TPMSSchemeHMAC{HashAlg: tpm2.TPMAlgSHA1})}})
	withPublic := func(p tpm2.TPM2BPublic) []byte {
		c := *ak
		c.Public = p
		return c.Marshal()
	}
	emptyCredential := *ak
	emptyCredential.Credential.Buffer = nil
	for name, c := range map[string]struct {
		b    []byte
		want string
	}{
		"empty":                     {nil, "empty"},
		"empty credential":          {emptyCredential.Marshal(), "structure 1, TPM2B_ID_OBJECT (the credential), is empty"},
		"an RSA key":                {withPublic(tpm2.New2B(notHMAC)), "not a keyed-hash"},
		"a restricted HMAC key":     {withPublic(tpm2.New2B(restricted)), "not an unrestricted signing key"},
		"HMAC-SHA1":                 {withPublic(tpm2.New2B(sha1)), "not HMAC-SHA256"},
		"bytes inside after public": {withPublic(tpm2.BytesAs2B[tpm2.TPMTPublic](append(ak.Public.Bytes(), 0))), "bytes after its end"},
		"one byte after":            {append(append([]byte(nil), good...), 0), "not a TPM2B_DATA"},
		"bytes after trailing data": {append(append([]byte(nil), good...), 0, 1, 'x', 'y'), "1 bytes after the trailing TPM2B_DATA"},
		"trailing data cut short":   {append(append([]byte(nil), good...), 0, 9, 'x'), "not a TPM2B_DATA"},
	} {
		_, err := attest.ParseAuthenticationKey(c.b)
		require.ErrorIs(t, err, attest.ErrInvalidChallenge, name)
		assert.ErrorContains(t, err, c.want, name)
	}
}

// FuzzParseAuthenticationKey reads whatever DPS (or a man in the middle of a broken TLS)
// might send: nothing panics, every refusal is ErrInvalidChallenge, and what is accepted is
// exactly the structures it consists of.
func FuzzParseAuthenticationKey(f *testing.F) {
	good := softwareChallenge(f)
	f.Add(good)
	f.Add(append(append([]byte(nil), good...), 0, 0))
	f.Add(append(append([]byte(nil), good...), 0, 2, 'o', 'k'))
	f.Add(good[:len(good)/2])
	f.Add([]byte{0, 1, 0})
	f.Fuzz(func(t *testing.T, b []byte) {
		ak, err := attest.ParseAuthenticationKey(b)
		if err != nil {
			if !errors.Is(err, attest.ErrInvalidChallenge) {
				t.Fatalf("refusal without ErrInvalidChallenge: %v", err)
			}
			return
		}
		if got := ak.Marshal(); string(got) != string(b) {
			t.Fatalf("accepted %x, which marshals back as %x", b, got)
		}
	})
}

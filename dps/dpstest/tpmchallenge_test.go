package dpstest_test

import (
	"bytes"
	"crypto/rand"
	"crypto/rsa"
	"testing"

	"github.com/google/go-tpm/tpm2"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/unicity-iot/unicity/attest"
	"github.com/unicity-iot/unicity/dps/dpstest"
)

// tpmKey is a TPM2B_PUBLIC made from template with a fresh RSA key of bits.
func tpmKey(t *testing.T, template tpm2.TPMTPublic, bits int) []byte {
	t.Helper()
	k, err := rsa.GenerateKey(rand.Reader, bits)
	require.NoError(t, err)
	if bits != 2048 {
		params, err := template.Parameters.RSADetail()
		require.NoError(t, err)
		p := *params
		p.KeyBits = tpm2.TPMKeyBits(bits)
		template.Parameters = tpm2.NewTPMUPublicParms(tpm2.TPMAlgRSA, &p)
	}
	template.Unique = tpm2.NewTPMUPublicID(tpm2.TPMAlgRSA, &tpm2.TPM2BPublicKeyRSA{Buffer: k.N.Bytes()})
	return tpm2.Marshal(tpm2.New2B(template))
}

// TestTPMChallenge: the challenge is the five structures a TPM answers (attest's tests answer
// it in the simulator and swtpm), around a fresh HMAC-SHA256 key each time.
func TestTPMChallenge(t *testing.T) {
	ek, srk := tpmKey(t, tpm2.RSAEKTemplate, 2048), tpmKey(t, tpm2.RSASRKTemplate, 2048)
	first, err := dpstest.NewTPMChallenge(ek, srk)
	require.NoError(t, err)
	second, err := dpstest.NewTPMChallenge(ek, srk)
	require.NoError(t, err)
	assert.Len(t, first.IdentityKey, 32)
	assert.False(t, bytes.Equal(first.IdentityKey, second.IdentityKey), "a new key for every challenge")

	ak, err := attest.ParseAuthenticationKey(first.AuthenticationKey)
	require.NoError(t, err)
	assert.Nil(t, ak.Data, "DPS's own clients read nothing after the public area")
	assert.Len(t, ak.CredentialSecret.Buffer, 256, "encrypted to the RSA-2048 EK")
	assert.Len(t, ak.ImportSecret.Buffer, 256, "encrypted to the RSA-2048 SRK")
	pub, err := ak.Public.Contents()
	require.NoError(t, err)
	assert.Equal(t, tpm2.TPMAlgKeyedHash, pub.Type)
	assert.False(t, pub.ObjectAttributes.FixedTPM || pub.ObjectAttributes.FixedParent, "only a duplicable object imports")
}

// TestTPMChallengeRefusesKeys: DPS takes RSA-2048 decryption keys, as TPM2B_PUBLIC.
func TestTPMChallengeRefusesKeys(t *testing.T) {
	ek, srk := tpmKey(t, tpm2.RSAEKTemplate, 2048), tpmKey(t, tpm2.RSASRKTemplate, 2048)
	eccSRK := tpm2.ECCSRKTemplate
	signing := tpm2.RSASRKTemplate
	signing.ObjectAttributes.Decrypt, signing.ObjectAttributes.SignEncrypt = false, true
	for name, keys := range map[string][2][]byte{
		"garbage EK":          {[]byte{0x01, 0x02, 0x03}, srk},
		"EK with bytes after": {append(append([]byte(nil), ek...), 0), srk},
		"empty SRK":           {ek, nil},
		"ECC SRK (systemd's)": {ek, tpm2.Marshal(tpm2.New2B(eccSRK))},
		"signing key as SRK":  {ek, tpmKey(t, signing, 2048)},
		"RSA-3072 EK":         {tpmKey(t, tpm2.RSAEKTemplate, 3072), srk},
	} {
		_, err := dpstest.NewTPMChallenge(keys[0], keys[1])
		require.ErrorIs(t, err, dpstest.ErrBadTPMKey, name)
	}
}

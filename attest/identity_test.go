package attest_test

import (
	"crypto"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"encoding/hex"
	"fmt"
	"math/big"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/google/go-tpm/tpm2"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/unicity-iot/unicity/attest"
	"github.com/unicity-iot/unicity/attest/attesttest"
	"github.com/unicity-iot/unicity/internal/certcodec"
	"github.com/unicity-iot/unicity/internal/pki"
	"github.com/unicity-iot/unicity/internal/version"
)

// The certificate checks do not depend on where the key lives, so most run with software
// keys (the file: key path); the TPM paths are covered by TestFactoryFlowMutualTLS.
func TestNewIdentityChecks(t *testing.T) {
	now := time.Date(2027, 6, 1, 12, 0, 0, 0, time.UTC)
	root, err := pki.NewRoot("root", pki.WithValidity(now.AddDate(-1, 0, 0), now.AddDate(5, 0, 0)))
	require.NoError(t, err)
	ica, err := root.NewIntermediate("factory CA", pki.WithValidity(now.AddDate(-1, 0, 0), now.AddDate(4, 0, 0)))
	require.NoError(t, err)
	key, err := pki.NewKey(pki.ECDSAP256)
	require.NoError(t, err)
	other, err := pki.NewKey(pki.ECDSAP256)
	require.NoError(t, err)
	valid := pki.WithValidity(now.Add(-time.Hour), now.AddDate(1, 0, 0))
	issue := func(cn string, opts ...pki.Option) []*x509.Certificate {
		l, err := ica.IssueDevice(cn, key.Public(), opts...)
		require.NoError(t, err)
		return l.Chain
	}
	good := issue("gw-0001", valid)
	server, err := ica.IssueServer([]string{"gw-0001"}, valid)
	require.NoError(t, err)
	setCommitTime(t, now.AddDate(0, -1, 0))

	for _, c := range []struct {
		name   string
		chain  []*x509.Certificate
		signer crypto.Signer
		now    time.Time
		want   error
	}{
		{"valid", good, key, now, nil},
		{"leaf only", good[:1], key, now, nil},
		{"with root", append(append([]*x509.Certificate{}, good...), root.Certificate), key, now, nil},
		{"no certificate", nil, key, now, attest.ErrInvalidIdentity},
		{"another key", good, other, now, attest.ErrKeyMismatch},
		{"CN too long", issue(strings.Repeat("a", 65), valid), key, now, attest.ErrBadRegistrationID},
		{"CN with a space", issue("gw 0001", valid), key, now, attest.ErrBadRegistrationID},
		{"CN ends in a dot", issue("gw-0001.", valid), key, now, attest.ErrBadRegistrationID},
		{"expired", good, key, now.AddDate(2, 0, 0), attest.ErrExpired},
		{"not yet valid", issue("gw-0001", pki.WithValidity(now.Add(time.Hour), now.AddDate(1, 0, 0))), key, now, attest.ErrClockNotSet},
		{"clock before the build", good, key, now.AddDate(0, -2, 0), attest.ErrClockNotSet},
		{"clock at the epoch", good, key, time.Unix(0, 0), attest.ErrClockNotSet},
		{"chain out of order", []*x509.Certificate{good[0], root.Certificate, ica.Certificate}, key, now, attest.ErrInvalidIdentity},
		{"chain reversed", []*x509.Certificate{root.Certificate, ica.Certificate, good[0]}, key, now, attest.ErrInvalidIdentity},
		{"server certificate", server.Chain, server.Key, now, attest.ErrInvalidIdentity},
	} {
		t.Run(c.name, func(t *testing.T) {
			id, err := attest.NewIdentity(c.chain, c.signer, c.now)
			if c.want != nil {
				require.ErrorIs(t, err, c.want)
				if c.want != attest.ErrKeyMismatch {
					assert.NotErrorIs(t, err, attest.ErrKeyMismatch, "the key is the certificate's")
				}
				t.Log(err)
				return
			}
			require.NoError(t, err)
			assert.Equal(t, "gw-0001", id.RegistrationID)
			tc := id.TLSCertificate()
			assert.Len(t, tc.Certificate, len(c.chain))
			assert.Equal(t, []tls.SignatureScheme{tls.ECDSAWithP256AndSHA256}, tc.SupportedSignatureAlgorithms)
		})
	}
}

// TestChainInTheWrongOrder: a device certificate that is not first is named, with its place,
// rather than reported as the certificate of another key.
func TestChainInTheWrongOrder(t *testing.T) {
	ca, _ := testCA(t)
	leaf, err := ca.NewDevice("gw-order")
	require.NoError(t, err)
	reversed := []*x509.Certificate{leaf.Chain[1], leaf.Chain[0]}
	got, err := attest.FindLeaf(reversed, leaf.Key.Public())
	require.ErrorIs(t, err, attest.ErrInvalidIdentity)
	assert.Same(t, leaf.Chain[0], got)
	assert.Contains(t, err.Error(), `the chain is in the wrong order: the device's certificate "gw-order" is number 2 of 2; it must come first`)
	_, err = attest.NewIdentity(reversed, leaf.Key, time.Now())
	assert.ErrorContains(t, err, "wrong order")

	got, err = attest.FindLeaf(leaf.Chain, leaf.Key.Public())
	require.NoError(t, err)
	assert.Same(t, leaf.Chain[0], got)
	other, err := pki.NewKey(pki.ECDSAP256)
	require.NoError(t, err)
	got, err = attest.FindLeaf(reversed, other.Public())
	require.ErrorIs(t, err, attest.ErrKeyMismatch)
	assert.Nil(t, got)
}

// setCommitTime stamps the build time as the Makefile would, for one test.
func setCommitTime(t *testing.T, at time.Time) {
	old := version.CommitUnix
	version.CommitUnix = strconv.FormatInt(at.Unix(), 10)
	t.Cleanup(func() { version.CommitUnix = old })
}

func TestRSASchemes(t *testing.T) {
	ca, _ := testCA(t)
	leaf, err := ca.NewDevice("gw-rsa", pki.WithKeyType(pki.RSA2048))
	require.NoError(t, err)
	id, err := attest.NewIdentity(leaf.Chain, leaf.Key, time.Now())
	require.NoError(t, err)
	assert.NotContains(t, id.TLSCertificate().SupportedSignatureAlgorithms, tls.PSSWithSHA512, "sign-only TPM RSA keys cannot do SHA-512")
}

func TestChainInNV(t *testing.T) {
	// An RSA leaf and intermediate are larger than one NV read or write (1024 bytes).
	root, err := pki.NewRoot("root", pki.WithKeyType(pki.RSA2048))
	require.NoError(t, err)
	ica, err := root.NewIntermediate("factory CA", pki.WithKeyType(pki.RSA2048))
	require.NoError(t, err)
	leaf, err := ica.NewDevice("gw-nv", pki.WithKeyType(pki.RSA2048))
	require.NoError(t, err)
	chain := leaf.Chain
	size := 0
	for _, c := range chain {
		size += len(c.Raw)
	}
	require.Greater(t, size, 1024)
	require.LessOrEqual(t, size, 2048, "TPM2_PT_NV_INDEX_MAX of both emulators")

	for _, tp := range tpms {
		t.Run(tp.name, func(t *testing.T) {
			tpm := tp.open(t)
			require.NoError(t, attest.WriteChainNV(tpm, 0x01c0000a, chain))
			got, err := attest.LoadChain(tpm, "tpm-nv:0x01c0000a")
			require.NoError(t, err)
			require.Len(t, got, len(chain))
			for i := range chain {
				assert.True(t, chain[i].Equal(got[i]))
			}
			err = attest.WriteChainNV(tpm, 0x01c0000a, chain)
			assert.ErrorIs(t, err, attest.ErrNVExists)

			_, err = attest.LoadChain(tpm, "tpm-nv:0x01000999")
			assert.ErrorIs(t, err, attest.ErrInvalidIdentity)
			_, err = attest.LoadChain(tpm, "tpm-nv:0x81000001")
			assert.ErrorIs(t, err, attest.ErrInvalidIdentity)
		})
	}
}

func TestLoadChainFile(t *testing.T) {
	ca, _ := testCA(t)
	leaf, err := ca.NewDevice("gw-file")
	require.NoError(t, err)
	dir := t.TempDir()
	path := filepath.Join(dir, "identity.pem")
	require.NoError(t, certcodec.WriteCertificates(path, leaf.Chain...))
	got, err := attest.LoadChain(nil, path)
	require.NoError(t, err)
	assert.Len(t, got, 2)

	garbage := filepath.Join(dir, "garbage.pem")
	require.NoError(t, os.WriteFile(garbage, []byte("not a certificate"), 0o600))
	for _, spec := range []string{garbage, filepath.Join(dir, "missing.pem")} {
		_, err := attest.LoadChain(nil, spec)
		assert.ErrorIs(t, err, attest.ErrInvalidIdentity)
	}
	_, err = attest.LoadChain(nil, "tpm-nv:0x01c0000a")
	assert.ErrorIs(t, err, attest.ErrNoTPM)
}

func TestManifest(t *testing.T) {
	tpm := attesttest.Simulator(t)
	ca, _ := testCA(t)
	key, _ := newKey(t, tpm, attest.ECDSAP256)
	id := enroll(t, key, ca, "gw-manifest")
	m := attest.NewManifest(id.Chain[0])
	leaf := id.Chain[0]
	assert.Equal(t, "gw-manifest", m.RegistrationID)
	assert.Regexp(t, `^[0-9A-F]{64}$`, m.SHA256Thumbprint)
	assert.Regexp(t, `^[0-9A-F]{40}$`, m.SHA1Thumbprint)
	assert.Regexp(t, `^[0-9a-f]{64}$`, m.PublicKeySHA256)
	assert.Equal(t, certcodec.Thumbprint(leaf), m.SHA256Thumbprint)
	assert.Equal(t, fmt.Sprintf("%X", leaf.SerialNumber.Bytes()), m.Serial)
	assert.Equal(t, "CN=unicity test factory CA", m.Issuer)
	assert.True(t, m.NotBefore.Equal(leaf.NotBefore))
	spki := sha256.Sum256(leaf.RawSubjectPublicKeyInfo)
	assert.Equal(t, hex.EncodeToString(spki[:]), m.PublicKeySHA256)

	// Whole bytes, as the portal shows them: a leading zero digit is kept.
	for serial, want := range map[int64]string{0xabc: "0ABC", 0x1f: "1F", 0x1234: "1234", 0: "00"} {
		c := *leaf
		c.SerialNumber = big.NewInt(serial)
		assert.Equal(t, want, attest.NewManifest(&c).Serial, "serial %#x", serial)
	}
}

// TestChainInPaddedNV reads a chain from an index defined larger than the chain, as
// `tpm2_nvdefine -s 2048` then `tpm2_nvwrite` leave it, and refuses an index of garbage.
func TestChainInPaddedNV(t *testing.T) {
	ca, _ := testCA(t)
	leaf, err := ca.NewDevice("gw-padded")
	require.NoError(t, err)
	var der []byte
	for _, c := range leaf.Chain {
		der = append(der, c.Raw...)
	}
	tpm := attesttest.Simulator(t)
	write := func(idx tpm2.TPMHandle, size int, data []byte) {
		t.Helper()
		_, err := tpm2.NVDefineSpace{
			AuthHandle: tpm2.TPMRHOwner,
			PublicInfo: tpm2.New2B(tpm2.TPMSNVPublic{
				NVIndex: idx, NameAlg: tpm2.TPMAlgSHA256,
				Attributes: tpm2.TPMANV{OwnerWrite: true, OwnerRead: true, AuthRead: true, AuthWrite: true, NoDA: true, NT: tpm2.TPMNTOrdinary},
				DataSize:   uint16(size),
			}),
		}.Execute(tpm)
		require.NoError(t, err)
		rp, err := tpm2.NVReadPublic{NVIndex: idx}.Execute(tpm)
		require.NoError(t, err)
		nh := tpm2.NamedHandle{Handle: idx, Name: rp.NVName}
		for off := 0; off < len(data); off += 512 {
			_, err := tpm2.NVWrite{AuthHandle: tpm2.TPMRHOwner, NVIndex: nh, Data: tpm2.TPM2BMaxNVBuffer{Buffer: data[off:min(off+512, len(data))]}, Offset: uint16(off)}.Execute(tpm)
			require.NoError(t, err)
		}
	}
	write(0x01000200, len(der)+300, der)
	got, err := attest.LoadChain(tpm, "tpm-nv:0x01000200")
	require.NoError(t, err)
	assert.Len(t, got, 2)

	write(0x01000201, 64, []byte("this is not a certificate at all, just some bytes in NV memory."))
	_, err = attest.LoadChain(tpm, "tpm-nv:0x01000201")
	assert.ErrorIs(t, err, attest.ErrInvalidIdentity)

	write(0x01000202, len(der)+8, append(append([]byte{}, der...), "trailing"...))
	_, err = attest.LoadChain(tpm, "tpm-nv:0x01000202")
	assert.ErrorIs(t, err, attest.ErrInvalidIdentity)
}

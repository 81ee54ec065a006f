package attest_test

import (
	"context"
	"crypto/rsa"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"testing"

	"github.com/google/go-tpm/tpm2"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/unicity-iot/unicity/attest"
	"github.com/unicity-iot/unicity/attest/attesttest"
	"github.com/unicity-iot/unicity/dps/dpstest"
)

// tpm2Tools runs a tpm2-tools command against the swtpm at sock, which must have no other
// client (swtpm serves one at a time).
func tpm2Tools(t testing.TB, sock string, args ...string) {
	t.Helper()
	cmd := exec.Command(attesttest.RequireTool(t, args[0]), args[1:]...)
	cmd.Env = append(os.Environ(), "TPM2TOOLS_TCTI=swtpm:path="+sock)
	out, err := cmd.CombinedOutput()
	require.NoError(t, err, "%v: %s", args, out)
}

// readEK opens the swtpm at sock for one ReadEndorsementKey.
func readEK(t testing.TB, sock string) *attest.EndorsementKey {
	t.Helper()
	tpm, err := attest.OpenTPM(context.Background(), "swtpm:"+sock)
	require.NoError(t, err)
	defer tpm.Close()
	ek, err := attest.ReadEndorsementKey(context.Background(), tpm)
	require.NoError(t, err)
	return ek
}

// TestEndorsementKeyMatchesTPM2Tools: the EK is the one tpm2_createek makes, with the TCG
// default template and with a TPM maker's template and nonce in NV; persisted at 0x81010001
// it is reused, and without it the same key is made again.
func TestEndorsementKeyMatchesTPM2Tools(t *testing.T) {
	sock := attesttest.StartSWTPM(t)
	dir := t.TempDir()
	pubFile := filepath.Join(dir, "ek.pub")

	tpm2Tools(t, sock, "tpm2_createek", "-G", "rsa", "-c", "0x81010001", "-u", pubFile)
	want, err := os.ReadFile(pubFile)
	require.NoError(t, err)
	ek := readEK(t, sock)
	assert.Equal(t, attest.EKHandle, ek.Handle, "the persistent EK is reused")
	assert.Equal(t, want, ek.Public)
	assert.False(t, ek.FromNVTemplate)
	assert.Nil(t, ek.Certificate, "this TPM has no EK certificate")

	tpm2Tools(t, sock, "tpm2_evictcontrol", "-C", "o", "-c", "0x81010001")
	ek = readEK(t, sock)
	assert.Zero(t, ek.Handle)
	assert.Equal(t, want, ek.Public, "the default template makes the same key")

	// A TPM maker's template in NV (here the TCG one with an empty unique field, as the C
	// SDK's template is) makes the key tpm2_createprimary makes from the same template.
	template := tpm2.RSAEKTemplate
	template.Unique = tpm2.NewTPMUPublicID(tpm2.TPMAlgRSA, &tpm2.TPM2BPublicKeyRSA{})
	writeNV := func(idx string, data []byte) {
		f := filepath.Join(dir, idx)
		require.NoError(t, os.WriteFile(f, data, 0o600))
		tpm2Tools(t, sock, "tpm2_nvdefine", idx, "-C", "o", "-s", strconv.Itoa(len(data)), "-a", "ownerread|ownerwrite|authread|authwrite")
		tpm2Tools(t, sock, "tpm2_nvwrite", idx, "-C", "o", "-i", f)
	}
	writeNV("0x01c00004", tpm2.Marshal(template))
	policy := filepath.Join(dir, "policy")
	require.NoError(t, os.WriteFile(policy, template.AuthPolicy.Buffer, 0o600))
	tpm2Tools(t, sock, "tpm2_createprimary", "-C", "e", "-g", "sha256", "-G", "rsa2048:aes128cfb", "-L", policy,
		"-a", "fixedtpm|fixedparent|sensitivedataorigin|adminwithpolicy|restricted|decrypt", "-c", filepath.Join(dir, "ek.ctx"), "-o", pubFile)
	tpm2Tools(t, sock, "tpm2_flushcontext", "-t")
	wantNV, err := os.ReadFile(pubFile)
	require.NoError(t, err)
	require.NotEqual(t, want, wantNV)
	ek = readEK(t, sock)
	assert.True(t, ek.FromNVTemplate)
	assert.Zero(t, ek.Handle)
	assert.Equal(t, wantNV, ek.Public)

	// With a nonce, the nonce starts the 256-byte unique field (TCG EK Credential Profile;
	// tpm2-tss's FAPI, later tpm2_createek -t; the 5.4 of Debian 12 copies the pointer, not the nonce).
	nonce := []byte("unicity EK nonce")
	writeNV("0x01c00003", nonce)
	ek = readEK(t, sock)
	assert.True(t, ek.FromNVTemplate)
	tpm, err := attest.OpenTPM(context.Background(), "swtpm:"+sock)
	require.NoError(t, err)
	defer tpm.Close()
	template.Unique = tpm2.NewTPMUPublicID(tpm2.TPMAlgRSA, &tpm2.TPM2BPublicKeyRSA{Buffer: append(nonce, make([]byte, 256-len(nonce))...)})
	cp, err := tpm2.CreatePrimary{PrimaryHandle: tpm2.TPMRHEndorsement, InPublic: tpm2.New2B(template)}.Execute(tpm)
	require.NoError(t, err)
	defer tpm2.FlushContext{FlushHandle: cp.ObjectHandle}.Execute(tpm)
	assert.Equal(t, tpm2.Marshal(cp.OutPublic), ek.Public)
	assert.NotEqual(t, wantNV, ek.Public)
}

// manufacturedSWTPM is a swtpm made by swtpm_setup as a TPM maker ships one: an RSA EK
// persisted at 0x81010001 and its certificate, from a private local CA, in NV at 0x01c00002.
// It returns the data socket.
func manufacturedSWTPM(t testing.TB) string {
	t.Helper()
	setup := attesttest.RequireTool(t, "swtpm_setup")
	localCA := attesttest.RequireTool(t, "swtpm_localca")
	bin := attesttest.RequireTool(t, "swtpm")
	dir, err := os.MkdirTemp("", "swtpm") // a socket path must stay under 108 bytes
	require.NoError(t, err)
	t.Cleanup(func() { os.RemoveAll(dir) })
	ca := filepath.Join(dir, "ca")
	require.NoError(t, os.Mkdir(ca, 0o700))
	files := map[string]string{
		"swtpm_setup.conf": "create_certs_tool = " + localCA + "\ncreate_certs_tool_config = " + filepath.Join(dir, "localca.conf") +
			"\ncreate_certs_tool_options = " + filepath.Join(dir, "localca.options") + "\nactive_pcr_banks = sha256\n",
		"localca.conf": "statedir = " + ca + "\nsigningkey = " + filepath.Join(ca, "signkey.pem") +
			"\nissuercert = " + filepath.Join(ca, "issuercert.pem") + "\ncertserial = " + filepath.Join(ca, "certserial") + "\n",
		"localca.options": "--platform-manufacturer unicity\n--platform-version 1\n--platform-model test\n",
	}
	for name, content := range files {
		require.NoError(t, os.WriteFile(filepath.Join(dir, name), []byte(content), 0o600))
	}
	out, err := exec.Command(setup, "--tpm2", "--tpmstate", dir, "--config", filepath.Join(dir, "swtpm_setup.conf"),
		"--create-ek-cert", "--overwrite").CombinedOutput()
	require.NoError(t, err, "swtpm_setup: %s", out)
	p, err := attesttest.Start(bin, dir)
	require.NoError(t, err)
	t.Cleanup(p.Stop)
	return p.Addr
}

// TestManufacturedTPM: on a TPM as its maker ships it, the persistent EK is used, its
// certificate from NV is found, and attestation goes through that EK. The identity key it
// persists is an ordinary TPM HMAC key: tpm2_hmac signs with it as the agent does.
func TestManufacturedTPM(t *testing.T) {
	sock := manufacturedSWTPM(t)
	tpm, err := attest.OpenTPM(context.Background(), "swtpm:"+sock)
	require.NoError(t, err)
	defer tpm.Close()
	d := newDevice(t, tpm, 0)
	assert.Equal(t, attest.EKHandle, d.ek.Handle)
	require.NotNil(t, d.ek.Certificate, "swtpm_setup wrote the EK certificate")
	pub, err := tpm2.Unmarshal[tpm2.TPM2BPublic](d.ek.Public)
	require.NoError(t, err)
	contents, err := pub.Contents()
	require.NoError(t, err)
	pk, err := tpm2.Pub(*contents)
	require.NoError(t, err)
	assert.True(t, d.ek.Certificate.PublicKey.(*rsa.PublicKey).Equal(pk))

	before := attesttest.LoadedHandles(t, tpm)
	challenge, err := dpstest.NewTPMChallenge(d.ek.Public, d.srk.Public)
	require.NoError(t, err)
	key := d.importKey(t, tpm, challenge, attest.DefaultIdentityKeyHandle)
	assertSignsFor(t, key, challenge.IdentityKey, d.ek.RegistrationID())
	assert.Equal(t, before, attesttest.LoadedHandles(t, tpm))
	require.NoError(t, tpm.Close()) // swtpm serves one client at a time

	dir := t.TempDir()
	data, out := filepath.Join(dir, "data"), filepath.Join(dir, "hmac")
	require.NoError(t, os.WriteFile(data, []byte("0ne00000001%2Fregistrations%2Fgw\n1700000000"), 0o600))
	tpm2Tools(t, sock, "tpm2_hmac", "-c", "0x81000100", "-g", "sha256", "-o", out, data)
	got, err := os.ReadFile(out)
	require.NoError(t, err)
	want, _ := attest.SymmetricKey(challenge.IdentityKey).Sign(context.Background(), must(os.ReadFile(data)))
	assert.Equal(t, want, got)
}

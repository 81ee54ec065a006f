package dps

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"encoding/base64"
	"encoding/json"
	"errors"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/unicity-iot/unicity/internal/dial"
	"github.com/unicity-iot/unicity/internal/pki"
	"github.com/unicity-iot/unicity/sas"
)

// testTPM is TPM attestation with placeholder keys, for what is checked before the TPM is used.
func testTPM() *TPM {
	return &TPM{EndorsementKey: []byte("ek"), StorageRootKey: []byte("srk"),
		Activate: func(context.Context, []byte) (sas.Signer, error) { return nil, errors.New("not used") }}
}

func testCert(t *testing.T, cn string) *tls.Certificate {
	t.Helper()
	ca, err := pki.NewRoot("Test Root")
	require.NoError(t, err)
	leaf, err := ca.NewDevice(cn)
	require.NoError(t, err)
	tc := leaf.TLSCertificate()
	return &tc
}

// TestRequestWire checks what goes on the wire against protocol.md §1.2 and §7.1.
func TestRequestWire(t *testing.T) {
	base := Request{Endpoint: "global.azure-devices-provisioning.net", IDScope: "0neFEEDC0DE"}

	t.Run("x509", func(t *testing.T) {
		req := base
		req.Certificate = testCert(t, "myRegistrationId")
		r, err := newRegistration(req)
		require.NoError(t, err)
		assert.Equal(t, "myRegistrationId", r.regID, "the CN")
		assert.Equal(t, "0neFEEDC0DE/registrations/myRegistrationId/api-version=2021-06-01&ClientVersion=unicity%2Fdev", r.username)
		assert.Equal(t, `{"registrationId":"myRegistrationId"}`, string(r.body))
		tok, err := r.sasToken(t.Context())
		require.NoError(t, err)
		assert.Empty(t, tok, "no password with X.509")
	})
	t.Run("custom payload", func(t *testing.T) {
		req := base
		req.Certificate = testCert(t, "myRegistrationId")
		req.Payload = json.RawMessage(`{"testData":1, "testData2":{"a":"b"}}`)
		r, err := newRegistration(req)
		require.NoError(t, err)
		assert.Equal(t, `{"registrationId":"myRegistrationId","payload":{"testData":1,"testData2":{"a":"b"}}}`, string(r.body))
	})
	t.Run("symmetric key", func(t *testing.T) {
		now := time.Unix(1578941692, 0).Add(-sasLifetime)
		req := base
		req.RegistrationID, req.SymmetricKey, req.Clock = "myRegistrationId", []byte("device key"), fixedClock(now)
		r, err := newRegistration(req)
		require.NoError(t, err)
		tok, err := r.sasToken(t.Context())
		require.NoError(t, err)
		assert.Equal(t, sas.Token([]byte("device key"), "0neFEEDC0DE/registrations/myRegistrationId", time.Unix(1578941692, 0), "registration"), tok)
		assert.Contains(t, tok, "&se=1578941692&skn=registration")
	})
	t.Run("group key", func(t *testing.T) {
		req := base
		req.RegistrationID, req.SymmetricKey, req.GroupKey = "dev-7", []byte("group key"), true
		r, err := newRegistration(req)
		require.NoError(t, err)
		assert.Equal(t, sas.DeviceKey([]byte("group key"), "dev-7"), r.symmetricKey)
	})
	t.Run("tpm", func(t *testing.T) {
		req := base
		req.RegistrationID, req.TPM = "myRegistrationId", testTPM()
		r, err := newRegistration(req)
		require.NoError(t, err)
		assert.Equal(t, `{"registrationId":"myRegistrationId","tpm":{"endorsementKey":"ZWs=","storageRootKey":"c3Jr"}}`, string(r.body))
		assert.Equal(t, dial.TransportHTTPS, r.dial.Transport, "auto means HTTPS for TPM attestation")
		assert.Equal(t, "2021-06-01", r.apiVersion)
		tok, err := r.sasToken(t.Context())
		require.NoError(t, err)
		assert.Empty(t, tok, "no SAS token before the challenge is answered")
	})
	t.Run("certificate request", func(t *testing.T) {
		key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
		require.NoError(t, err)
		req := base
		req.Certificate, req.CSRSigner = testCert(t, "myRegistrationId"), key
		r, err := newRegistration(req)
		require.NoError(t, err)
		assert.Contains(t, r.username, "/api-version=2026-11-02-preview&", "the version that carries connectionProfile")
		var body struct{ RegistrationID, CSR string }
		require.NoError(t, json.Unmarshal(r.body, &body))
		der, err := base64.StdEncoding.DecodeString(body.CSR)
		require.NoError(t, err, "base64 DER, no PEM")
		csr, err := x509.ParseCertificateRequest(der)
		require.NoError(t, err)
		assert.NoError(t, csr.CheckSignature())
		assert.Equal(t, "myRegistrationId", csr.Subject.CommonName)
		assert.True(t, key.PublicKey.Equal(csr.PublicKey))
	})
}

func TestRequestRejected(t *testing.T) {
	cert := testCert(t, "GW-001")
	tests := []struct {
		name    string
		req     Request
		want    string
		refused bool
	}{
		{"no endpoint", Request{IDScope: "0ne1", Certificate: cert}, "DPS endpoint and ID scope are required", false},
		{"no scope", Request{Endpoint: "h", Certificate: cert}, "DPS endpoint and ID scope are required", false},
		{"no credentials", Request{Endpoint: "h", IDScope: "0ne1"}, "no certificate, no symmetric key and no TPM", false},
		{"both credentials", Request{Endpoint: "h", IDScope: "0ne1", Certificate: cert, SymmetricKey: []byte("k")}, "choose one attestation", false},
		{"certificate and TPM", Request{Endpoint: "h", IDScope: "0ne1", Certificate: cert, TPM: testTPM()}, "choose one attestation", false},
		{"symmetric key and TPM", Request{Endpoint: "h", IDScope: "0ne1", RegistrationID: "r", SymmetricKey: []byte("k"), TPM: testTPM()}, "choose one attestation", false},
		{"TPM without registration ID", Request{Endpoint: "h", IDScope: "0ne1", TPM: testTPM()}, "no registration ID configured", false},
		{"TPM without activation", Request{Endpoint: "h", IDScope: "0ne1", RegistrationID: "r", TPM: &TPM{EndorsementKey: []byte("ek"), StorageRootKey: []byte("srk")}},
			"the endorsement key, storage root key or activation is missing", false},
		{"TPM over MQTT", Request{Endpoint: "h", IDScope: "0ne1", RegistrationID: "r", TPM: testTPM(), Transport: dial.TransportWebSocket},
			"cannot register with TPM attestation over mqtt-ws: DPS serves it over HTTPS only", false},
		{"symmetric key without registration ID", Request{Endpoint: "h", IDScope: "0ne1", SymmetricKey: []byte("k")}, "no registration ID configured", false},
		{"registration ID is not the CN", Request{Endpoint: "h", IDScope: "0ne1", Certificate: cert, RegistrationID: "gw-01"},
			"registration ID 'gw-01' does not match certificate CN 'GW-001'", true},
		{"payload not an object", Request{Endpoint: "h", IDScope: "0ne1", Certificate: cert, Payload: json.RawMessage(`[]`)}, "not a JSON object", false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := newRegistration(tt.req)
			require.Error(t, err)
			assert.Contains(t, err.Error(), tt.want)
			assert.Equal(t, tt.refused, errors.Is(err, ErrRefused))
		})
	}
}

// TestOrderIssuedChain: the leaf is the certificate for our key, wherever DPS puts it.
func TestOrderIssuedChain(t *testing.T) {
	root, err := pki.NewRoot("Issuing Root")
	require.NoError(t, err)
	inter, err := root.NewIntermediate("Issuing CA")
	require.NoError(t, err)
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	require.NoError(t, err)
	leaf, err := inter.IssueDevice("gw-csr", key.Public())
	require.NoError(t, err)
	l, i, r := leaf.Certificate().Raw, inter.Certificate.Raw, root.Certificate.Raw

	for name, in := range map[string][][]byte{
		"leaf first (SPEC)":          {l, i, r},
		"root first (ESDK-C vector)": {r, i, l},
		"shuffled":                   {i, l, r},
		"without the root":           {i, l},
	} {
		t.Run(name, func(t *testing.T) {
			got, err := orderIssuedChain(in, key.Public())
			require.NoError(t, err)
			want := [][]byte{l, i, r}[:len(in)]
			assert.Equal(t, want, got)
		})
	}

	other, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	require.NoError(t, err)
	_, err = orderIssuedChain([][]byte{l, i, r}, other.Public())
	assert.ErrorContains(t, err, "no certificate for this device's key")
	_, err = orderIssuedChain([][]byte{[]byte("LEAF CERT")}, key.Public())
	assert.Error(t, err)
	_, err = orderIssuedChain([][]byte{l, i, r, r, r, r, r}, key.Public())
	assert.ErrorContains(t, err, "7 certificates, more than 6")
}

// TestAssignmentChecks: what an assigned reply must carry besides a hub (certificates.md §1).
func TestAssignmentChecks(t *testing.T) {
	root, err := pki.NewRoot("Issuing Root")
	require.NoError(t, err)
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	require.NoError(t, err)
	leaf, err := root.IssueDevice("gw-csr", key.Public())
	require.NoError(t, err)
	chain := [][]byte{leaf.Certificate().Raw, root.Certificate.Raw}

	withCSR, err := newRegistration(Request{Endpoint: "h", IDScope: "0ne1", Certificate: testCert(t, "gw-csr"), CSRSigner: key})
	require.NoError(t, err)
	without, err := newRegistration(Request{Endpoint: "h", IDScope: "0ne1", Certificate: testCert(t, "gw-csr")})
	require.NoError(t, err)
	state := func(profile string, chain [][]byte) *registrationState {
		return &registrationState{RegistrationID: "gw-csr", AssignedHub: "contoso.azure-devices.net", DeviceID: "gw-csr",
			ConnectionProfile: profile, IssuedChain: chain}
	}
	for _, profile := range []string{"", "classic"} {
		a, err := withCSR.assignment(state(profile, chain))
		require.NoError(t, err, "profile %q is MQTT 3.1.1", profile)
		assert.Equal(t, chain, a.IssuedChain)
	}

	tests := []struct {
		name string
		r    *registration
		st   *registrationState
		is   error
	}{
		{"MQTT 5 hub", withCSR, state("mqttV5", chain), ErrMQTT5},
		{"MQTT 5 hub without a CSR", without, state("mqttV5", nil), ErrMQTT5},
		{"unknown profile", withCSR, state("mqttV7", chain), ErrConnectionProfile},
		{"profile is case-sensitive", without, state("Classic", nil), ErrConnectionProfile},
		{"CSR sent, no chain returned", withCSR, state("classic", nil), ErrNotIssued},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := tt.r.assignment(tt.st)
			require.ErrorIs(t, err, tt.is)
			assert.ErrorIs(t, err, ErrRefused, "permanent: retrying gets the same answer")
			var e *Error
			require.ErrorAs(t, err, &e)
			assert.False(t, e.Temporary())
			assert.Contains(t, err.Error(), "contoso.azure-devices.net", "names the hub")
		})
	}
}

// TestCSRSize: a CSR DPS would refuse for its size is refused before connecting. No key the
// agent makes gets near the limit, so the encoding is tested on its own.
func TestCSRSize(t *testing.T) {
	b64, err := encodeCSR(make([]byte, 6144))
	require.NoError(t, err)
	assert.Len(t, b64, 8192, "at the limit")
	_, err = encodeCSR(make([]byte, 6145))
	assert.ErrorContains(t, err, "8196 base64 characters, more than DPS takes (8192)")
}

type fixedClock time.Time

func (c fixedClock) Now() time.Time                     { return time.Time(c) }
func (fixedClock) After(time.Duration) <-chan time.Time { return nil }

// TestPause: exponential backoff with full jitter, capped; never under retry-after, and never
// under DPS's 2 s poll limit once DPS has answered.
func TestPause(t *testing.T) {
	clock := &recordingClock{}
	r, err := newRegistration(Request{Endpoint: "h", IDScope: "0ne1", Certificate: testCert(t, "gw"), Clock: clock,
		Jitter: func(d time.Duration) time.Duration { return d }})
	require.NoError(t, err)
	network := &Error{Message: "dropped", temporary: true}
	for range 10 {
		require.NoError(t, r.pause(t.Context(), network))
	}
	s := time.Second
	assert.Equal(t, []time.Duration{s, 2 * s, 4 * s, 8 * s, 16 * s, 32 * s, 64 * s, 120 * s, 120 * s, 120 * s}, clock.waits)

	r.failures, clock.waits = 0, nil
	r.jitter = func(time.Duration) time.Duration { return 0 }
	require.NoError(t, r.pause(t.Context(), network))
	require.NoError(t, r.pause(t.Context(), &Error{Status: 500, temporary: true}))
	require.NoError(t, r.pause(t.Context(), &Error{Status: 429, RetryAfter: 40 * s, temporary: true}))
	assert.Equal(t, []time.Duration{0, 2 * s, 40 * s}, clock.waits)
}

type recordingClock struct{ waits []time.Duration }

func (c *recordingClock) Now() time.Time { return time.Now() }
func (c *recordingClock) After(d time.Duration) <-chan time.Time {
	c.waits = append(c.waits, d)
	ch := make(chan time.Time, 1)
	ch <- time.Now()
	return ch
}

package dps_test

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"crypto/x509"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"net/http"
	"net/http/httptest"
	"net/url"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/unicity-iot/unicity/attest"
	"github.com/unicity-iot/unicity/dps"
	"github.com/unicity-iot/unicity/dps/dpstest"
	"github.com/unicity-iot/unicity/internal/dial"
	"github.com/unicity-iot/unicity/internal/dial/dialtest"
	"github.com/unicity-iot/unicity/sas"
)

// TestRegisterHTTPS is the main path over HTTPS: register, poll after DPS's retry-after,
// assigned; no MQTT connection at all.
func TestRegisterHTTPS(t *testing.T) {
	s := newServer(t, func(c *dpstest.Config) { c.RetryAfter = 5 * time.Second })
	req, clock, log := requestOver(t, s, "gw-https-01", dial.TransportHTTPS)
	a, err := dps.Register(t.Context(), req)
	require.NoError(t, err)

	assert.Equal(t, dpstest.DefaultHub, a.AssignedHub)
	assert.Equal(t, "gw-https-01", a.DeviceID)
	assert.Equal(t, "initialAssignment", a.Substatus)
	assert.Equal(t, dial.TransportHTTPS, a.Transport)
	assert.WithinDuration(t, time.Now(), a.CreatedAt, time.Minute)
	assert.Equal(t, []time.Duration{5 * time.Second}, clock.Waits(), "DPS's Retry-After header")
	assert.Equal(t, []string{"connected to DPS over https", "DPS is assigning a hub; polling in 5 s"}, log.all())
	assert.Equal(t, dpstest.Stats{Registrations: 1, Polls: 1, Assignments: 1}, s.Stats())
}

// TestRegisterHTTPSPayloadAndIssuance: custom allocation data goes both ways, and a CSR is
// sent with its api-version and comes back as a certificate, as over MQTT.
func TestRegisterHTTPSPayloadAndIssuance(t *testing.T) {
	s := newServer(t)
	allocateWith(t, s, func(r dpstest.AllocationRequest) (dpstest.AllocationResult, error) {
		return dpstest.AllocationResult{Hub: r.LinkedHubs[0], Payload: r.Payload}, nil
	})
	require.NoError(t, s.SetCredentialPolicy("factory", &dpstest.CredentialPolicy{Name: "ops", Validity: time.Hour}))
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	require.NoError(t, err)
	req, _, _ := requestOver(t, s, "gw-https-csr", dial.TransportHTTPS)
	req.Payload, req.CSRSigner = json.RawMessage(`{"site":"north"}`), key
	a, err := dps.Register(t.Context(), req)
	require.NoError(t, err)
	assert.JSONEq(t, `{"site":"north"}`, string(a.Payload))
	require.NotEmpty(t, a.IssuedChain)
	leaf, err := x509.ParseCertificate(a.IssuedChain[0])
	require.NoError(t, err)
	assert.True(t, key.PublicKey.Equal(leaf.PublicKey))
	assert.Equal(t, "gw-https-csr", leaf.Subject.CommonName)
	assert.Equal(t, time.Hour, leaf.NotAfter.Sub(leaf.NotBefore), "the enrollment's policy")
}

// TestRegisterAutoFallsBackToHTTPS: behind a firewall that blocks 8883 and a middlebox that
// refuses WebSocket upgrades on 443, auto registers over HTTPS; the next registration, told
// what worked, goes there first, and so does a reconnect within one registration.
func TestRegisterAutoFallsBackToHTTPS(t *testing.T) {
	s := newServer(t, func(c *dpstest.Config) {
		c.Faults = []dpstest.Fault{{Step: dpstest.StepWebSocket, Action: dpstest.Status, Status: http.StatusForbidden}}
	})
	host := dpstest.GlobalHost
	firewall := dialtest.NewProxy(t, dialtest.WithRoute(host+":8883", ""), dialtest.WithRoute(host+":443", s.WebSocketAddr()))
	https443 := host + ":443"

	req, _, _ := requestOver(t, s, "gw-fallback", dial.TransportAuto)
	req.Endpoint, req.Proxy = host, firewall.URL.String()
	a, err := dps.Register(t.Context(), req)
	require.NoError(t, err)
	assert.Equal(t, dial.TransportHTTPS, a.Transport)
	assert.Equal(t, []string{https443, https443}, firewall.Tunnels(), "the WebSocket attempt, then HTTPS")

	t.Run("the remembered transport goes first", func(t *testing.T) {
		before := len(firewall.Tunnels())
		req.PreferTransport = a.Transport
		again, err := dps.Register(t.Context(), req)
		require.NoError(t, err)
		assert.Equal(t, dial.TransportHTTPS, again.Transport)
		assert.Equal(t, []string{https443}, firewall.Tunnels()[before:], "no WebSocket attempt")
	})
	t.Run("a reconnect goes where the registration got through", func(t *testing.T) {
		s.AddFault(dpstest.Fault{Step: dpstest.StepRegister, Action: dpstest.Drop, Times: 1})
		before := len(firewall.Tunnels())
		req.PreferTransport = ""
		again, err := dps.Register(t.Context(), req)
		require.NoError(t, err)
		assert.Equal(t, dial.TransportHTTPS, again.Transport)
		assert.Equal(t, []string{https443, https443, https443}, firewall.Tunnels()[before:],
			"WebSocket, HTTPS (dropped), then HTTPS again without trying the WebSocket")
	})
}

// tpmDPS is DPS's side of TPM attestation over HTTPS, as certificates.md §4 has it, for the
// test of the device side's seam (the emulator has no TPM enrollments): the first register
// request is answered with a challenge, the next ones must be signed with the key in it.
type tpmDPS struct {
	t          *testing.T
	scope      string
	challenge  []byte
	key        []byte // the identity key that DPS checks the SAS tokens with
	challenges int    // how many unsigned register requests get a challenge; later ones are refused

	mu       sync.Mutex
	unsigned int
	requests []string // method, path and whether a valid SAS token came with it
}

func (d *tpmDPS) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	base := "/" + d.scope + "/registrations/tpm-dev"
	auth := r.Header.Get("Authorization")
	signed := auth != "" && d.validSAS(auth)
	d.mu.Lock()
	d.requests = append(d.requests, fmt.Sprintf("%s %s signed=%t", r.Method, strings.TrimPrefix(r.URL.Path, base), signed))
	if !signed {
		d.unsigned++
	}
	challenge := !signed && d.unsigned <= d.challenges
	d.mu.Unlock()
	w.Header().Set("Content-Type", "application/json; charset=utf-8")
	unauthorized := func() {
		w.WriteHeader(http.StatusUnauthorized)
		fmt.Fprint(w, `{"errorCode":401002,"trackingId":"t-2","message":"Unauthorized"}`)
	}

	switch {
	case r.Method == http.MethodPut && r.URL.Path == base+"/register":
		var body struct {
			RegistrationID string
			TPM            struct{ EndorsementKey, StorageRootKey []byte }
		}
		assert.NoError(d.t, json.NewDecoder(r.Body).Decode(&body))
		assert.Equal(d.t, "tpm-dev", body.RegistrationID)
		assert.Equal(d.t, []byte("ek public"), body.TPM.EndorsementKey)
		assert.Equal(d.t, []byte("srk public"), body.TPM.StorageRootKey)
		switch {
		case challenge:
			w.WriteHeader(http.StatusUnauthorized)
			fmt.Fprintf(w, `{"authenticationKey":%q}`, base64.StdEncoding.EncodeToString(d.challenge))
		case !signed:
			unauthorized()
		default:
			w.Header().Set("Retry-After", "3")
			w.WriteHeader(http.StatusAccepted)
			fmt.Fprint(w, `{"operationId":"4.op.1","status":"assigning"}`)
		}
	case r.Method == http.MethodGet && r.URL.Path == base+"/operations/4.op.1" && signed:
		fmt.Fprint(w, `{"operationId":"4.op.1","status":"assigned","registrationState":{"registrationId":"tpm-dev",`+
			`"assignedHub":"hub.example","deviceId":"tpm-dev","status":"assigned","substatus":"initialAssignment",`+
			`"tpm":{"authenticationKey":"c2VlbiBiZWZvcmU="}}}`)
	default:
		unauthorized()
	}
}

// validSAS checks a token as DPS does: this registration, not expired, signed with the key.
func (d *tpmDPS) validSAS(token string) bool {
	fields, err := url.ParseQuery(strings.TrimPrefix(token, "SharedAccessSignature "))
	if err != nil {
		return false
	}
	se, err := strconv.ParseInt(fields.Get("se"), 10, 64)
	if err != nil || time.Unix(se, 0).Before(time.Now()) || fields.Get("sr") != d.scope+"/registrations/tpm-dev" || fields.Get("skn") != "registration" {
		return false
	}
	mac := hmac.New(sha256.New, d.key)
	mac.Write([]byte(url.QueryEscape(fields.Get("sr")) + "\n" + fields.Get("se")))
	sig, err := base64.StdEncoding.DecodeString(fields.Get("sig"))
	return err == nil && hmac.Equal(sig, mac.Sum(nil))
}

func (d *tpmDPS) seen() []string {
	d.mu.Lock()
	defer d.mu.Unlock()
	return append([]string(nil), d.requests...)
}

// TestRegisterTPMAttestation checks the seam TPM attestation plugs into: the 401 challenge
// goes to TPM.Activate, and the SAS tokens of the requests after it are signed by the signer
// it returns, here a software HMAC key standing in for the TPM's imported identity key.
func TestRegisterTPMAttestation(t *testing.T) {
	key := []byte("identity key that DPS sent, 32 b")
	start := func(t *testing.T, challenges int, dpsKey []byte) (*tpmDPS, dps.Request, *[][]byte) {
		d := &tpmDPS{t: t, scope: "0ne0000TPM1", challenge: []byte("credential blob and duplicate"), key: dpsKey, challenges: challenges}
		srv := httptest.NewTLSServer(d)
		t.Cleanup(srv.Close)
		roots := x509.NewCertPool()
		roots.AddCert(srv.Certificate())
		var mu sync.Mutex
		activated := &[][]byte{}
		req := dps.Request{
			Endpoint: srv.Listener.Addr().String(), IDScope: d.scope, RegistrationID: "tpm-dev", RootCAs: roots,
			TPM: &dps.TPM{EndorsementKey: []byte("ek public"), StorageRootKey: []byte("srk public"),
				Activate: func(_ context.Context, authenticationKey []byte) (sas.Signer, error) {
					mu.Lock()
					defer mu.Unlock()
					*activated = append(*activated, authenticationKey)
					return attest.SymmetricKey(key), nil
				}},
			Clock: &fakeClock{}, Jitter: halfJitter, ReplyTimeout: 5 * time.Second,
		}
		return d, req, activated
	}

	t.Run("assigned", func(t *testing.T) {
		d, req, activated := start(t, 1, key)
		log := &progressLog{}
		req.Progress = log.add
		a, err := dps.Register(t.Context(), req) // auto: TPM attestation goes over HTTPS only
		require.NoError(t, err)
		assert.Equal(t, "hub.example", a.AssignedHub)
		assert.Equal(t, "tpm-dev", a.DeviceID)
		assert.Equal(t, dial.TransportHTTPS, a.Transport)
		assert.Equal(t, [][]byte{[]byte("credential blob and duplicate")}, *activated)
		assert.Equal(t, []string{
			"PUT /register signed=false",
			"PUT /register signed=true",
			"GET /operations/4.op.1 signed=true",
		}, d.seen())
		assert.Contains(t, log.all(), "answered DPS's TPM attestation challenge: the identity key is in the TPM")
	})
	t.Run("the TPM refuses the challenge", func(t *testing.T) {
		d, req, _ := start(t, 1, key)
		req.TPM.Activate = func(context.Context, []byte) (sas.Signer, error) {
			return nil, fmt.Errorf("activate credential: %w", attest.ErrNotThisTPM)
		}
		_, err := dps.Register(t.Context(), req)
		require.ErrorIs(t, err, attest.ErrNotThisTPM, "the caller classifies what the TPM said")
		assert.Contains(t, err.Error(), "cannot answer DPS's TPM attestation challenge")
		assert.Len(t, d.seen(), 1, "not retried")
	})
	t.Run("DPS refuses the signed request", func(t *testing.T) {
		d, req, activated := start(t, 2, []byte("another key"))
		_, err := dps.Register(t.Context(), req)
		require.ErrorIs(t, err, dps.ErrRefused)
		assert.Contains(t, err.Error(), "DPS did not accept the SAS token signed with the TPM's identity key for registration ID 'tpm-dev'")
		assert.Len(t, *activated, 1, "a second challenge is a refusal, not a loop")
		assert.Equal(t, []string{"PUT /register signed=false", "PUT /register signed=false"}, d.seen())
	})
	t.Run("no enrollment for the endorsement key", func(t *testing.T) {
		_, req, activated := start(t, 0, key)
		_, err := dps.Register(t.Context(), req)
		require.ErrorIs(t, err, dps.ErrRefused)
		var e *dps.Error
		require.ErrorAs(t, err, &e)
		assert.Equal(t, 401, e.Status)
		assert.Equal(t, 401002, e.ErrorCode)
		assert.Contains(t, err.Error(), "no individual enrollment matches this TPM's endorsement key (registration ID 'tpm-dev')")
		assert.Empty(t, *activated)
	})
}

package hubtest_test

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/unicity-iot/unicity/dps/dpstest"
	"github.com/unicity-iot/unicity/hub/hubtest"
	"github.com/unicity-iot/unicity/internal/certcodec"
	"github.com/unicity-iot/unicity/internal/pki"
)

// caIssuer signs every CSR with its CA, or fails with err; it counts what it signed.
type caIssuer struct {
	ca       *pki.CA
	validity time.Duration
	mu       sync.Mutex
	err      error
	signed   int
}

func (i *caIssuer) IssueCertificate(_ string, csr *x509.CertificateRequest) ([]*x509.Certificate, error) {
	i.mu.Lock()
	defer i.mu.Unlock()
	if i.err != nil {
		return nil, i.err
	}
	now := time.Now().Truncate(time.Second)
	leaf, err := i.ca.SignCSR(csr, pki.WithValidity(now, now.Add(i.validity)))
	if err != nil {
		return nil, err
	}
	i.signed++
	return append(leaf.Chain, i.ca.Root()), nil
}

func (i *caIssuer) fail(err error) {
	i.mu.Lock()
	defer i.mu.Unlock()
	i.err = err
}

// renewal is a hub with an issuer and a device holding an operational certificate from it.
type renewal struct {
	*fixture
	issuer *caIssuer
	id     string
	cert   tls.Certificate
}

func newRenewal(t *testing.T, opts ...hubtest.Option) *renewal {
	t.Helper()
	f := newFixture(t, opts...)
	issuing, err := f.srv.CA.NewIntermediate("issuing CA")
	require.NoError(t, err)
	r := &renewal{fixture: f, issuer: &caIssuer{ca: issuing, validity: time.Hour}, id: "gw-ops"}
	f.srv.SetIssuer(r.issuer)
	leaf, err := issuing.NewDevice(r.id)
	require.NoError(t, err)
	require.NoError(t, f.srv.Register(hubtest.Device{ID: r.id, Issued: []*x509.Certificate{leaf.Certificate()}}))
	r.cert = leaf.TLSCertificate()
	return r
}

// session connects the device with cert, subscribed to the credentials answers.
func (r *renewal) session(t *testing.T, cert tls.Certificate) *client {
	t.Helper()
	c := r.mustConnect(t, clientConfig{id: r.id, cert: &cert, clean: true})
	c.subscribe(t, "$iothub/credentials/res/#", 1)
	return c
}

func newKey(t *testing.T) crypto.Signer {
	t.Helper()
	k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	require.NoError(t, err)
	return k
}

func csrB64(t *testing.T, cn string, key crypto.Signer) string {
	t.Helper()
	der, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{Subject: pkix.Name{CommonName: cn}}, key)
	require.NoError(t, err)
	return base64.StdEncoding.EncodeToString(der)
}

// request publishes an issueCertificate request; replace is the raw JSON value or "".
func (c *client) request(t *testing.T, rid, id, csr, replace string) {
	t.Helper()
	body := fmt.Sprintf(`{"id":%q,"csr":%q`, id, csr)
	if replace != "" {
		body += `,"replace":` + replace
	}
	c.publish(t, "$iothub/credentials/POST/issueCertificate/?$rid="+rid, 1, []byte(body+"}"))
}

// answer is a credentials answer: its status and $rid from the topic, and its body.
type answer struct {
	status int
	rid    string
	body   struct {
		CorrelationID    string   `json:"correlationId"`
		OperationExpires string   `json:"operationExpires"`
		Certificates     []string `json:"certificates"`
		ErrorCode        int      `json:"errorCode"`
		RetryAfter       int      `json:"retryAfter"`
		Message          string   `json:"message"`
	}
}

func (c *client) answer(t *testing.T) answer {
	t.Helper()
	m := c.next(t)
	rest, ok := strings.CutPrefix(m.Topic(), "$iothub/credentials/res/")
	require.True(t, ok, m.Topic())
	var a answer
	n, err := fmt.Sscanf(rest, "%d/?$rid=%s", &a.status, &a.rid)
	require.NoError(t, err, m.Topic())
	require.Equal(t, 2, n)
	require.NoError(t, json.Unmarshal(m.Payload(), &a.body), "%s", m.Payload())
	return a
}

// acceptedThen reads a 202 and the final answer to the same request, in either order: the hub
// sends them in order, but the test client hands messages over on goroutines of their own.
func (c *client) acceptedThen(t *testing.T) (accepted, final answer) {
	t.Helper()
	a, b := c.answer(t), c.answer(t)
	if b.status == 202 {
		a, b = b, a
	}
	require.Equal(t, 202, a.status, "one answer is 202: %+v, %+v", a, b)
	require.Equal(t, a.rid, b.rid)
	return a, b
}

func TestIssueCertificateWire(t *testing.T) {
	r := newRenewal(t)
	c := r.session(t, r.cert)
	key := newKey(t)
	c.request(t, "7", r.id, csrB64(t, r.id, key), "")

	a, final := c.acceptedThen(t)
	assert.Equal(t, "7", a.rid)
	assert.NotEmpty(t, a.body.CorrelationID)
	expires, err := time.Parse(time.RFC3339, a.body.OperationExpires)
	require.NoError(t, err)
	assert.WithinDuration(t, time.Now().Add(12*time.Hour), expires, time.Minute)

	a = final
	require.Equal(t, 200, a.status, "%+v", a.body)
	assert.Equal(t, "7", a.rid)
	require.Len(t, a.body.Certificates, 3, "leaf first, up to the root")
	der, err := base64.StdEncoding.DecodeString(a.body.Certificates[0])
	require.NoError(t, err)
	leaf, err := x509.ParseCertificate(der)
	require.NoError(t, err)
	assert.True(t, key.Public().(*ecdsa.PublicKey).Equal(leaf.PublicKey))

	info, err := r.srv.Device(r.id)
	require.NoError(t, err)
	assert.Contains(t, info.Auth, "x509-issued")
	require.Len(t, info.Operational, 2, "the new certificate and the one in use")
	assert.Equal(t, certcodec.Thumbprint(leaf), info.Operational[1].Thumbprint)
	assert.Equal(t, leaf.NotAfter.UTC(), info.Operational[1].NotAfter)

	renewed := tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key, Leaf: leaf}
	for _, crt := range []tls.Certificate{renewed, r.cert} {
		_, err := r.connect(t, clientConfig{id: r.id, cert: &crt, clean: true})
		assert.NoError(t, err, "both certificates are the device's")
	}
}

func TestIssueCertificateRefusals(t *testing.T) {
	r := newRenewal(t)
	c := r.session(t, r.cert)
	valid := csrB64(t, r.id, newKey(t))
	tests := []struct {
		name, id, csr string
		status, code  int
	}{
		{"not this device's id", "gw-other", valid, 400, 400004},
		{"csr not base64", r.id, "%%%", 400, 400040},
		{"csr not a CSR", r.id, base64.StdEncoding.EncodeToString([]byte("hello")), 400, 400040},
		{"csr too long", r.id, strings.Repeat("A", 8196), 400, 400040},
	}
	for i, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			rid := fmt.Sprint(i)
			c.request(t, rid, tt.id, tt.csr, "")
			a := c.answer(t)
			assert.Equal(t, tt.status, a.status)
			assert.Equal(t, tt.code, a.body.ErrorCode)
			assert.Equal(t, rid, a.rid)
		})
	}
	t.Run("body not JSON", func(t *testing.T) {
		c.publish(t, "$iothub/credentials/POST/issueCertificate/?$rid=j", 1, []byte("{"))
		a := c.answer(t)
		assert.Equal(t, 400004, a.body.ErrorCode)
	})
	for _, tt := range []struct {
		err    error
		status int
		code   int
	}{
		{fmt.Errorf("policy: %w", dpstest.ErrCSRRejected), 400, 400040},
		{fmt.Errorf("enrollment: %w", dpstest.ErrNoCredentialPolicy), 400, 400040},
		{fmt.Errorf("device: %w", dpstest.ErrNotFound), 404, 404001},
		{fmt.Errorf("the HSM is down"), 500, 500001},
	} {
		t.Run(tt.err.Error(), func(t *testing.T) {
			r.issuer.fail(tt.err)
			defer r.issuer.fail(nil)
			c.request(t, "e", r.id, valid, "")
			_, a := c.acceptedThen(t) // the signer fails after the hub accepted
			assert.Equal(t, tt.status, a.status)
			assert.Equal(t, tt.code, a.body.ErrorCode)
			assert.Contains(t, a.body.Message, tt.err.Error())
		})
	}
	t.Run("without $rid the connection is closed", func(t *testing.T) {
		before := r.srv.Stats().Violations
		c.Publish("$iothub/credentials/POST/issueCertificate/", 1, false, []byte(`{}`))
		c.waitLost(t)
		assert.Equal(t, before+1, r.srv.Stats().Violations)
	})
}

// One operation per device: a second is refused with 409005 until it replaces the first, by
// "*" or by the first's $rid; replacing nothing is 412001. The replaced one is never answered.
func TestIssueCertificateReplace(t *testing.T) {
	r := newRenewal(t)
	c := r.session(t, r.cert)
	csr := csrB64(t, r.id, newKey(t))

	r.srv.FailIssue(1, hubtest.IssueFault{Silent: true})
	c.request(t, "1", r.id, csr, "")
	assert.Equal(t, 202, c.answer(t).status)
	c.request(t, "2", r.id, csr, "")
	a := c.answer(t)
	assert.Equal(t, 409, a.status)
	assert.Equal(t, 409005, a.body.ErrorCode)
	c.request(t, "3", r.id, csr, `"9"`)
	assert.Equal(t, 412001, c.answer(t).body.ErrorCode, "no operation with that $rid")

	r.srv.FailIssue(1, hubtest.IssueFault{Silent: true})
	c.request(t, "4", r.id, csr, `"1"`)
	assert.Equal(t, 202, c.answer(t).status, "replaced by $rid")
	c.request(t, "5", r.id, csr, `"*"`)
	_, a = c.acceptedThen(t)
	assert.Equal(t, "5", a.rid, "replaced by *; only the last operation is answered")
	assert.Equal(t, 200, a.status)

	c.request(t, "6", r.id, csr, `"*"`)
	a = c.answer(t)
	assert.Equal(t, 412, a.status)
	assert.Equal(t, 412001, a.body.ErrorCode, "nothing to replace")
	c.request(t, "7", r.id, csr, `null`)
	_, a = c.acceptedThen(t)
	assert.Equal(t, 200, a.status, "null is no replace")
}

func TestIssueFaults(t *testing.T) {
	r := newRenewal(t)
	c := r.session(t, r.cert)
	csr := csrB64(t, r.id, newKey(t))

	r.srv.FailIssue(2, hubtest.IssueFault{Status: 429, ErrorCode: 429002, RetryAfter: 1500 * time.Millisecond})
	for range 2 {
		c.request(t, "t", r.id, csr, "")
		a := c.answer(t)
		assert.Equal(t, 429, a.status, "no 202 first")
		assert.Equal(t, 429002, a.body.ErrorCode)
		assert.Equal(t, 2, a.body.RetryAfter, "whole seconds, rounded up")
	}
	c.request(t, "ok", r.id, csr, "")
	_, a := c.acceptedThen(t)
	assert.Equal(t, 200, a.status, "two faults, then the normal answer")

	r.srv.FailIssue(0, hubtest.IssueFault{Status: 400, ErrorCode: 400040, Accepted: true})
	for range 3 {
		c.request(t, "p", r.id, csr, "")
		_, a := c.acceptedThen(t)
		assert.Equal(t, 400040, a.body.ErrorCode, "every request, until told otherwise")
	}
	r.srv.FailIssue(0, hubtest.IssueFault{})
	c.request(t, "ok", r.id, csr, "")
	_, a = c.acceptedThen(t)
	assert.Equal(t, 200, a.status)

	r.srv.FailIssue(1, hubtest.IssueFault{Drop: true})
	c.Publish("$iothub/credentials/POST/issueCertificate/?$rid=d", 1, false, []byte(`{"id":"`+r.id+`","csr":"`+csr+`"}`))
	c.waitLost(t)
}

func TestRevoke(t *testing.T) {
	r := newRenewal(t)
	c := r.session(t, r.cert)
	c.request(t, "1", r.id, csrB64(t, r.id, newKey(t)), "")
	_, a := c.acceptedThen(t)
	require.Equal(t, 200, a.status)
	info, err := r.srv.Device(r.id)
	require.NoError(t, err)
	require.Len(t, info.Operational, 2)
	renewed := info.Operational[1].Thumbprint

	revoked, err := r.srv.Revoke(r.id, strings.ToLower(certcodec.Thumbprint(r.cert.Leaf)))
	require.NoError(t, err)
	require.Len(t, revoked, 1)
	assert.Equal(t, certcodec.Thumbprint(r.cert.Leaf), revoked[0].Thumbprint)
	c.waitLost(t)
	_, err = r.connect(t, clientConfig{id: r.id, cert: &r.cert, clean: true})
	assert.ErrorContains(t, err, "not Authorized")
	refusals := r.srv.Refusals()
	assert.Contains(t, refusals[len(refusals)-1].Reason, "never issued, expired or revoked")

	_, err = r.srv.Revoke(r.id, certcodec.Thumbprint(r.cert.Leaf))
	assert.ErrorIs(t, err, hubtest.ErrNotIssued, "already revoked")
	revoked, err = r.srv.Revoke(r.id, "")
	require.NoError(t, err)
	assert.Equal(t, renewed, revoked[0].Thumbprint, "all that are left")
	_, err = r.connect(t, clientConfig{id: r.id, cert: &r.cert, clean: true})
	require.Error(t, err)
	refusals = r.srv.Refusals()
	assert.Contains(t, refusals[len(refusals)-1].Reason, "no credential left")
	_, err = r.srv.Revoke(r.id, "")
	assert.ErrorIs(t, err, hubtest.ErrNotIssued)
	_, err = r.srv.Revoke("gw-nobody", "")
	assert.ErrorIs(t, err, hubtest.ErrDeviceNotFound)
}

// Register adds issued certificates to those the device holds, dropping the expired.
func TestIssuedCertificatesAccumulate(t *testing.T) {
	now := time.Now()
	clock := func() time.Time { return now }
	f := newFixture(t, hubtest.WithClock(clock))
	ca, err := f.srv.CA.NewIntermediate("issuing CA")
	require.NoError(t, err)
	issue := func(validity time.Duration) *pki.Leaf {
		l, err := ca.NewDevice("gw-acc", pki.WithValidity(now.Add(-time.Minute), now.Add(validity)))
		require.NoError(t, err)
		return l
	}
	short, long := issue(time.Hour), issue(3*time.Hour)
	require.NoError(t, f.srv.Register(hubtest.Device{ID: "gw-acc", Issued: []*x509.Certificate{short.Certificate()}}))
	require.NoError(t, f.srv.Register(hubtest.Device{ID: "gw-acc", Issued: []*x509.Certificate{long.Certificate(), long.Certificate()}}))
	info, err := f.srv.Device("gw-acc")
	require.NoError(t, err)
	assert.Len(t, info.Operational, 2, "each once")

	now = now.Add(2 * time.Hour)
	crt := short.TLSCertificate()
	_, err = f.connect(t, clientConfig{id: "gw-acc", cert: &crt, clean: true})
	assert.Error(t, err, "expired")
	require.NoError(t, f.srv.Register(hubtest.Device{ID: "gw-acc"}))
	info, err = f.srv.Device("gw-acc")
	require.NoError(t, err)
	require.Len(t, info.Operational, 1, "the expired one is dropped")
	assert.Equal(t, certcodec.Thumbprint(long.Certificate()), info.Operational[0].Thumbprint)
}

// A hub without certificate management refuses the credentials subscription.
func TestCredentialsSubscriptionNeedsIssuer(t *testing.T) {
	f := newFixture(t)
	cert := f.device(t, "gw-sub")
	c := f.mustConnect(t, clientConfig{id: "gw-sub", cert: &cert, clean: true})
	tok := c.Subscribe("$iothub/credentials/res/#", 1, nil)
	require.True(t, tok.WaitTimeout(10*time.Second))
	assert.Equal(t, byte(0x80), tok.(interface{ Result() map[string]byte }).Result()["$iothub/credentials/res/#"])
}

// The journal hears of each certificate issued and revoked, so that a restarted hub accepts
// the same ones; a certificate it could not keep is answered 500, not issued.
func TestOperationalCertificatesJournaled(t *testing.T) {
	j := newJournal()
	r := newRenewal(t, hubtest.WithJournal(j))
	c := r.session(t, r.cert)
	c.request(t, "1", r.id, csrB64(t, r.id, newKey(t)), "")
	_, a := c.acceptedThen(t)
	require.Equal(t, 200, a.status)
	devs, _ := j.saved()
	require.Len(t, devs, 1)
	assert.Len(t, devs[0].Issued, 2)

	j.mu.Lock()
	j.fail = errors.New("disk full")
	j.mu.Unlock()
	c.request(t, "2", r.id, csrB64(t, r.id, newKey(t)), "")
	_, a = c.acceptedThen(t)
	assert.Equal(t, 500, a.status)
	assert.Equal(t, hubtest.CodeInternal, a.body.ErrorCode)
	info, err := r.srv.Device(r.id)
	require.NoError(t, err)
	assert.Len(t, info.Operational, 2, "not issued")
	j.mu.Lock()
	j.fail = nil
	j.mu.Unlock()

	_, err = r.srv.Revoke(r.id, certcodec.Thumbprint(r.cert.Leaf))
	require.NoError(t, err)
	devs, _ = j.saved()
	require.Len(t, devs[0].Issued, 1, "the revocation is kept")

	restarted := newFixture(t)
	require.NoError(t, restarted.srv.Restore(devs, nil))
	info, err = restarted.srv.Device(r.id)
	require.NoError(t, err)
	require.Len(t, info.Operational, 1)
	assert.Equal(t, certcodec.Thumbprint(devs[0].Issued[0]), info.Operational[0].Thumbprint)
}

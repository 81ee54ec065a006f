package hub_test

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"errors"
	"path/filepath"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/unicity-iot/unicity/attest"
	"github.com/unicity-iot/unicity/attest/attesttest"
	"github.com/unicity-iot/unicity/dps"
	"github.com/unicity-iot/unicity/dps/dpstest"
	"github.com/unicity-iot/unicity/hub"
	"github.com/unicity-iot/unicity/hub/hubtest"
	"github.com/unicity-iot/unicity/internal/certcodec"
	"github.com/unicity-iot/unicity/internal/dial"
)

// renewalRig is DPS with a credential policy on its factory enrollment and one hub that
// issues through it, over real TLS on loopback, trusting one root.
type renewalRig struct {
	dps *dpstest.Server
	hub *hubtest.Server
}

func newRenewalRig(t *testing.T) *renewalRig {
	t.Helper()
	d, srv := hubtest.NewIssuing(t, time.Hour)
	return &renewalRig{dps: d, hub: srv}
}

func newP256(t testing.TB) crypto.Signer {
	k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	require.NoError(t, err)
	return k
}

// identity checks an issued chain for key and makes the TLS identity of it.
func identity(t testing.TB, chain [][]byte, key crypto.Signer) tls.Certificate {
	t.Helper()
	id, err := attest.IssuedIdentity(chain, key, time.Now())
	require.NoError(t, err)
	return id.TLSCertificate()
}

// provision registers id through DPS with a CSR for key and returns its operational identity.
func (r *renewalRig) provision(t *testing.T, id string, key crypto.Signer) tls.Certificate {
	t.Helper()
	onboarding, err := r.dps.FactoryCA().NewDevice(id)
	require.NoError(t, err)
	cert := onboarding.TLSCertificate()
	a, err := dps.Register(testContext(t), dps.Request{Endpoint: r.dps.Addr(), IDScope: r.dps.IDScope(),
		Transport: dial.TransportMQTT, RootCAs: r.dps.RootCAs(), Certificate: &cert, CSRSigner: key, Clock: hubtest.InstantClock{}})
	require.NoError(t, err)
	require.Equal(t, r.hub.Name(), a.AssignedHub)
	return identity(t, a.IssuedChain, key)
}

// renewing is a connected client of a provisioned device that may renew.
func (r *renewalRig) renewing(t *testing.T, id string, opts ...func(*hub.Config)) (*running, tls.Certificate) {
	t.Helper()
	cert := r.provision(t, id, newP256(t))
	cfg := config(r.hub, id, cert)
	cfg.CertificateRenewal = true
	for _, o := range opts {
		o(&cfg)
	}
	c := start(t, cfg)
	c.connected(t)
	return c, cert
}

func csrFor(t testing.TB, key crypto.Signer, regID string) []byte {
	t.Helper()
	der, err := attest.CreateCSR(key, regID)
	require.NoError(t, err)
	return der
}

// connects reports whether a fresh session with cert is accepted by the hub.
func (r *renewalRig) connects(t *testing.T, id string, cert tls.Certificate) error {
	t.Helper()
	cfg := config(r.hub, id, cert)
	cfg.MaxFailures = 1
	c, err := hub.New(cfg)
	require.NoError(t, err)
	ctx, cancel := context.WithCancel(testContext(t))
	defer cancel()
	ran, connected := make(chan error, 1), make(chan error, 1)
	go func() { ran <- c.Run(ctx) }()
	go func() { connected <- c.AwaitConnection(ctx) }()
	select {
	case err := <-ran:
		return err
	case <-connected:
		cancel()
		<-ran
		return nil
	}
}

// The main path: a device provisioned with a DPS-issued certificate renews it through the hub
// for a new key in the TPM, and both certificates then work until the old one is revoked.
func TestIssueCertificate(t *testing.T) {
	r := newRenewalRig(t)
	c, old := r.renewing(t, "gw-renew")

	tpm := attesttest.Simulator(t)
	key, err := attest.NewOperationalKey(tpm, attest.ECDSAP384, filepath.Join(t.TempDir(), "next.key"))
	require.NoError(t, err)
	defer key.Destroy()
	chain, err := c.IssueCertificate(testContext(t), csrFor(t, key, "gw-renew"), false)
	require.NoError(t, err)
	require.Len(t, chain, 3, "leaf, issuing CA, root")
	renewed := identity(t, chain, key)
	assert.True(t, c.State().Connected, "the session stays up")

	info, err := r.hub.Device("gw-renew")
	require.NoError(t, err)
	assert.Equal(t, "2025-08-01-preview", info.APIVersion, "renewing sessions send the certificate management api-version")
	assert.Len(t, info.Operational, 2, "the old certificate stays valid until it expires")
	c.stop(t) // one connection per device: it would kick the sessions below
	require.NoError(t, r.connects(t, "gw-renew", renewed))
	require.NoError(t, r.connects(t, "gw-renew", old))

	_, err = r.hub.Revoke("gw-renew", certcodec.Thumbprint(old.Leaf))
	require.NoError(t, err)
	assert.ErrorIs(t, r.connects(t, "gw-renew", old), hub.ErrNotAuthorized, "revoked: refused at CONNECT")
	require.NoError(t, r.connects(t, "gw-renew", renewed))
}

// Sessions that do not renew are as before: no credentials subscription, the usual
// api-version, and IssueCertificate refused.
func TestIssueCertificateOff(t *testing.T) {
	r := newRenewalRig(t)
	c := start(t, config(r.hub, "gw-off", r.provision(t, "gw-off", newP256(t))))
	c.connected(t)
	_, err := c.IssueCertificate(testContext(t), csrFor(t, newP256(t), "gw-off"), false)
	assert.ErrorIs(t, err, hub.ErrRenewalOff)
	info, err := r.hub.Device("gw-off")
	require.NoError(t, err)
	assert.Equal(t, "2021-04-12", info.APIVersion)
}

// A hub without certificate management refuses the credentials subscription: the session
// serves all the same, and IssueCertificate says why it cannot renew (the agent then renews
// through DPS).
func TestIssueCertificateSubscriptionRefused(t *testing.T) {
	srv := hubtest.NewServer(t)
	ca := newDeviceCA(t)
	cert := ca.softwareDevice(t, srv.Hub, "gw-nosub")
	cfg := config(srv, "gw-nosub", cert)
	cfg.CertificateRenewal = true
	c := start(t, cfg)
	c.connected(t)
	_, err := c.IssueCertificate(testContext(t), csrFor(t, newP256(t), "gw-nosub"), false)
	require.ErrorIs(t, err, hub.ErrRenewalOff)
	assert.ErrorContains(t, err, "refused the subscription to $iothub/credentials/res/#")
}

// Each answer that is not a certificate is a *CertificateError, transient or permanent as
// certificates.md §3 says, whether or not a 202 came first.
func TestIssueCertificateErrors(t *testing.T) {
	r := newRenewalRig(t)
	c, _ := r.renewing(t, "gw-err")
	ctx := testContext(t)
	tests := []struct {
		status, code int
		retryAfter   time.Duration
		accepted     bool
		temporary    bool
		is           error
	}{
		{status: 400, code: 400040},
		{status: 409, code: 409005, is: hub.ErrOperationActive},
		{status: 409, code: 409004, is: hub.ErrOperationActive},
		{status: 412, code: 412001, is: hub.ErrNothingToReplace},
		{status: 429, code: 429002, retryAfter: 7 * time.Second, temporary: true},
		{status: 429, code: 429003, accepted: true, temporary: true},
		{status: 503, code: 503001, temporary: true},
		{status: 500, code: 500001, accepted: true, temporary: true},
		{status: 500, code: 0, temporary: true},
		{status: 404, code: 404001},
	}
	for _, tt := range tests {
		t.Run(itoa(tt.code), func(t *testing.T) {
			r.hub.FailIssue(1, hubtest.IssueFault{Status: tt.status, ErrorCode: tt.code, RetryAfter: tt.retryAfter, Accepted: tt.accepted})
			_, err := c.IssueCertificate(ctx, csrFor(t, newP256(t), "gw-err"), false)
			var ce *hub.CertificateError
			require.ErrorAs(t, err, &ce)
			assert.Equal(t, tt.status, ce.Status)
			assert.Equal(t, tt.code, ce.ErrorCode)
			assert.Equal(t, tt.retryAfter, ce.RetryAfter)
			assert.Equal(t, tt.temporary, ce.Temporary())
			if tt.is != nil {
				assert.ErrorIs(t, err, tt.is)
			}
		})
	}

	t.Run("policy refuses the key", func(t *testing.T) {
		k, err := ecdsa.GenerateKey(elliptic.P224(), rand.Reader)
		require.NoError(t, err)
		_, err = c.IssueCertificate(ctx, csrFor(t, k, "gw-err"), false)
		var ce *hub.CertificateError
		require.ErrorAs(t, err, &ce)
		assert.Equal(t, hub.CodeBadCSR, ce.ErrorCode)
		assert.False(t, ce.Temporary())
		assert.ErrorContains(t, err, "not EC P-224")
	})
	t.Run("not a CSR", func(t *testing.T) {
		_, err := c.IssueCertificate(ctx, []byte("not DER"), false)
		assert.ErrorContains(t, err, "not a PKCS#10 request")
	})
	chain, err := c.IssueCertificate(ctx, csrFor(t, newP256(t), "gw-err"), false)
	require.NoError(t, err, "the session is fine after all that")
	assert.NotEmpty(t, chain)
}

// deadlineClock holds the timers of the certificate request's deadline, of length hold,
// until the test moves time past them, and fires the others (the reconnect backoff) at once.
type deadlineClock struct {
	*manualClock
	hold time.Duration
}

func newDeadlineClock(hold time.Duration) *deadlineClock {
	return &deadlineClock{&manualClock{now: time.Now(), armed: make(chan time.Duration, 8)}, hold}
}

func (c *deadlineClock) After(d time.Duration) <-chan time.Time {
	if d != c.hold {
		ch := make(chan time.Time, 1)
		ch <- c.Now()
		return ch
	}
	return c.manualClock.After(d)
}

// silentRequest starts a request the hub accepts and never answers, and returns once the
// client has taken the 202 (its deadline restarted); the request's error comes on the
// channel.
func silentRequest(t *testing.T, r *renewalRig, c *running, clock *deadlineClock, id string) <-chan error {
	t.Helper()
	r.hub.FailIssue(1, hubtest.IssueFault{Silent: true})
	errs := make(chan error, 1)
	go func() {
		_, err := c.IssueCertificate(testContext(t), csrFor(t, newP256(t), id), false)
		errs <- err
	}()
	<-clock.armed
	<-clock.armed // restarted by the 202: the hub has the request
	return errs
}

// An operation the client gave up on stays active at the hub: a new request is refused
// (409005) until it replaces it, and replacing what is not there is refused (412001).
func TestIssueCertificateReplace(t *testing.T) {
	clock := newDeadlineClock(hub.DefaultIssueTimeout)
	r := newRenewalRig(t)
	c, _ := r.renewing(t, "gw-replace", func(cfg *hub.Config) { cfg.Clock = clock })
	ctx := testContext(t)

	errs := silentRequest(t, r, c, clock, "gw-replace")
	_, err := c.IssueCertificate(ctx, csrFor(t, newP256(t), "gw-replace"), false)
	assert.ErrorIs(t, err, hub.ErrRenewalBusy, "one request at a time per session")
	clock.set(clock.Now().Add(hub.DefaultIssueTimeout))
	assert.ErrorIs(t, <-errs, hub.ErrTimeout, "its own timeout, not the hub's 12 hours")

	_, err = c.IssueCertificate(ctx, csrFor(t, newP256(t), "gw-replace"), false)
	require.ErrorIs(t, err, hub.ErrOperationActive)
	<-clock.armed
	key := newP256(t)
	chain, err := c.IssueCertificate(ctx, csrFor(t, key, "gw-replace"), true)
	require.NoError(t, err)
	identity(t, chain, key)
	_, err = c.IssueCertificate(ctx, csrFor(t, newP256(t), "gw-replace"), true)
	assert.ErrorIs(t, err, hub.ErrNothingToReplace)
}

// A 202 restarts the client's deadline; the certificate comes after it.
func TestIssueCertificateAcceptedThenIssued(t *testing.T) {
	clock := newDeadlineClock(5 * time.Second)
	r := newRenewalRig(t)
	c, _ := r.renewing(t, "gw-202", func(cfg *hub.Config) { cfg.Clock, cfg.IssueTimeout = clock, 5*time.Second })
	r.hub.FailIssue(1, hubtest.IssueFault{Delay: 200 * time.Millisecond})
	key := newP256(t)
	chain, err := c.IssueCertificate(testContext(t), csrFor(t, key, "gw-202"), false)
	require.NoError(t, err)
	identity(t, chain, key)
	for _, why := range []string{"the deadline at the request", "started again by the 202"} {
		select {
		case d := <-clock.armed:
			assert.Equal(t, 5*time.Second, d, why)
		case <-time.After(10 * time.Second):
			t.Fatalf("no timer: %s", why)
		}
	}
}

// The wait survives a reconnect once the hub has the request; a connection that drops before
// the hub acknowledged it is reported as such.
func TestIssueCertificateConnectionLoss(t *testing.T) {
	clock := newDeadlineClock(hub.DefaultIssueTimeout)
	r := newRenewalRig(t)
	c, _ := r.renewing(t, "gw-loss", func(cfg *hub.Config) { cfg.Clock = clock })
	ctx := testContext(t)

	r.hub.FailIssue(1, hubtest.IssueFault{Drop: true})
	_, err := c.IssueCertificate(ctx, csrFor(t, newP256(t), "gw-loss"), false)
	assert.ErrorIs(t, err, hub.ErrRequestLost, "not sent again: it may be an operation at the hub")
	<-clock.armed
	require.NoError(t, r.hub.Await(ctx, func() bool { return r.hub.Stats().Connections >= 2 }), "reconnected")
	c.connected(t)

	errs := silentRequest(t, r, c, clock, "gw-loss")
	require.NoError(t, r.hub.Disconnect("gw-loss"))
	require.NoError(t, r.hub.Await(ctx, func() bool { return r.hub.Stats().Connections >= 3 }), "reconnected")
	c.connected(t)
	select {
	case err := <-errs:
		t.Fatalf("gave up on the reconnect: %v", err)
	default:
	}
	clock.set(clock.Now().Add(hub.DefaultIssueTimeout))
	err = <-errs
	assert.ErrorIs(t, err, hub.ErrTimeout)
	assert.False(t, errors.Is(err, hub.ErrRequestLost))
}

// Package dps registers one device identity with the Azure Device Provisioning Service over
// MQTT (TLS on 8883, WebSocket on 443) or its REST API over HTTPS (443), optionally through a
// proxy, and returns the IoT Hub it was assigned to. One call registers, polls and retries what is worth retrying; it stores
// nothing and decides no policy beyond that call.
package dps

import (
	"context"
	"crypto"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"net/url"
	"strings"
	"time"

	"github.com/unicity-iot/unicity/internal/backoff"
	"github.com/unicity-iot/unicity/internal/clock"
	"github.com/unicity-iot/unicity/internal/dial"
	"github.com/unicity-iot/unicity/internal/version"
	"github.com/unicity-iot/unicity/sas"
)

const (
	apiVersion = "2021-06-01"
	// apiVersionCSR is sent when the registration carries a CSR: the version Microsoft's new
	// C client sends (certificates.md §1), and the first that returns connectionProfile,
	// without which an assignment to an MQTT 5 hub could not be told apart. Issuance itself
	// starts at 2025-07-01-preview. Registrations without a CSR keep apiVersion, which
	// every device in the field uses.
	apiVersionCSR = "2026-11-02-preview"

	// minPollInterval is DPS's limit: 5 polls per 10 s per device (protocol.md §2.6).
	minPollInterval = 2 * time.Second
	// maxCSR is the longest csr DPS takes, in base64 characters (certificates.md §1: 8 KB).
	maxCSR = 8192
	// maxIssuedChain is the most certificates an issued chain may hold: Microsoft's C
	// client refuses more (certificates.md §1).
	maxIssuedChain = 6

	// DefaultReplyTimeout bounds the wait for CONNACK, SUBACK, PUBACK and each reply.
	DefaultReplyTimeout = 30 * time.Second
	backoffBase         = time.Second
	backoffCap          = 2 * time.Minute
	sasLifetime         = time.Hour
)

// userAgent names this client to DPS: ClientVersion over MQTT, User-Agent over HTTPS.
var userAgent = "unicity/" + version.Version

// Request says who registers, where, and how.
type Request struct {
	// Endpoint is the DPS host, "global.azure-devices-provisioning.net" or "host:port".
	Endpoint string
	IDScope  string
	// RegistrationID defaults to the certificate's CN; with a certificate it must equal it.
	RegistrationID string

	// Transport is dial.TransportMQTT, dial.TransportWebSocket, dial.TransportHTTPS or
	// dial.TransportAuto (empty: auto, which tries them in that order). PreferTransport is the
	// one that worked last time (Assignment.Transport).
	Transport       string
	PreferTransport string
	// Proxy is an http:// CONNECT proxy URL; empty: https_proxy from the environment.
	Proxy string
	// RootCAs verifies DPS; nil means Azure's roots (dial.RootPool adds a bundle).
	RootCAs *x509.CertPool

	// Certificate is the X.509 identity (leaf + intermediates and the signer), or nil for
	// symmetric-key attestation with SymmetricKey, the decoded key. With GroupKey set,
	// SymmetricKey is the enrollment group's key and the device key is derived from it. Or TPM,
	// for TPM attestation.
	Certificate  *tls.Certificate
	SymmetricKey []byte
	GroupKey     bool
	TPM          *TPM

	// Payload is custom allocation data, a JSON object; Assignment.Payload is the reply's.
	Payload json.RawMessage
	// CSRSigner, when set, asks DPS to issue a certificate for its public key (protocol.md §4);
	// the chain comes back in Assignment.IssuedChain.
	CSRSigner crypto.Signer

	// Progress, if set, learns what the call is doing and why it waits, in plain words. It
	// is called on Register's goroutine and must not block.
	Progress func(Progress)
	// ReplyTimeout bounds each wait for DPS; zero means DefaultReplyTimeout.
	ReplyTimeout time.Duration
	// Clock and Jitter pace polls and retries; nil means real time and math/rand.
	Clock  clock.Clock
	Jitter func(max time.Duration) time.Duration
}

// TPM is the device's side of TPM attestation (certificates.md §4): an individual enrollment
// of the TPM's endorsement key, over HTTPS only (DPS serves no TPM attestation over MQTT).
// The registration needs RegistrationID.
type TPM struct {
	// EndorsementKey and StorageRootKey are the marshalled TPM2B_PUBLIC of each
	// (attest.EndorsementKey.Public, attest.StorageRootKey.Public).
	EndorsementKey, StorageRootKey []byte
	// Activate answers DPS's challenge to the first register request: authenticationKey is
	// the decoded authenticationKey of its 401 (attest.ImportIdentityKey takes it). It
	// imports the identity key DPS sent into the TPM and returns what signs with it
	// (attest.HMACKey); the rest of the registration is authenticated by SAS tokens it
	// signs. Its error ends Register, wrapped, for the caller to classify
	// (attest.ErrNotThisTPM is a refusal).
	Activate func(ctx context.Context, authenticationKey []byte) (sas.Signer, error)
}

// Progress reports a step of a registration, for the agent's status line.
type Progress struct {
	// Message is for a technician: "connected to DPS over mqtt-ws",
	// "throttled by DPS; retrying in 40 s".
	Message string
	// Wait is how long the call now waits, zero if it does not.
	Wait time.Duration
	// Err is the temporary error behind a retry, nil otherwise.
	Err error
}

// Assignment is where DPS put this device.
type Assignment struct {
	AssignedHub    string // "host" or, from the emulator, "host:port"
	DeviceID       string
	Substatus      string
	RegistrationID string
	// Payload is the custom allocation function's reply, nil when DPS sent none.
	Payload json.RawMessage
	// IssuedChain holds the DER certificates DPS issued for Request.CSRSigner: the leaf (the
	// one for our key) first, then its issuers.
	IssuedChain [][]byte
	// Transport is the one that carried the registration, to prefer next time.
	Transport            string
	CreatedAt, UpdatedAt time.Time
}

// Register registers the device and returns its assignment. Temporary failures (throttling,
// server errors, network, timeouts) are retried with backoff until ctx ends; then the last
// of them is returned, with ctx's error. Permanent ones return at once and match ErrRefused.
func Register(ctx context.Context, req Request) (*Assignment, error) {
	r, err := newRegistration(req)
	if err != nil {
		return nil, err
	}
	return r.run(ctx)
}

// registration is one Register call's state, kept across reconnects.
type registration struct {
	req          Request
	regID        string
	symmetricKey []byte
	signer       sas.Signer // the TPM's identity key, once DPS's challenge is answered
	apiVersion   string
	username     string
	body         []byte
	csrPublic    crypto.PublicKey
	dial         dial.Config
	clock        clock.Clock
	jitter       func(time.Duration) time.Duration
	replyTimeout time.Duration

	transport   string // the last that connected
	operationID string // cached across reconnects, so polling resumes
	failures    int    // consecutive temporary failures, for backoff
	last        *Error // the latest temporary failure, reported if ctx ends
}

func newRegistration(req Request) (*registration, error) {
	if req.Endpoint == "" || req.IDScope == "" {
		return nil, errors.New("cannot register: DPS endpoint and ID scope are required")
	}
	r := &registration{req: req, regID: req.RegistrationID, clock: req.Clock, jitter: req.Jitter, replyTimeout: req.ReplyTimeout}
	if r.clock == nil {
		r.clock = clock.System{}
	}
	if r.jitter == nil {
		r.jitter = backoff.Jitter
	}
	if r.replyTimeout <= 0 {
		r.replyTimeout = DefaultReplyTimeout
	}

	transport := req.Transport
	given := 0
	for _, set := range []bool{req.Certificate != nil, req.SymmetricKey != nil, req.TPM != nil} {
		if set {
			given++
		}
	}
	switch {
	case given > 1:
		return nil, errors.New("cannot register: more than one of a certificate, a symmetric key and a TPM given; choose one attestation")
	case req.Certificate != nil:
		cn, err := leafCN(req.Certificate)
		if err != nil {
			return nil, err
		}
		if r.regID == "" {
			r.regID = cn
		}
		if r.regID != cn {
			return nil, refused("registration ID %s does not match certificate CN %s", quote(r.regID), quote(cn))
		}
	case len(req.SymmetricKey) > 0:
		if r.regID == "" {
			return nil, errors.New("cannot register with a symmetric key: no registration ID configured")
		}
		r.symmetricKey = req.SymmetricKey
		if req.GroupKey {
			r.symmetricKey = sas.DeviceKey(req.SymmetricKey, r.regID)
		}
	case req.TPM != nil:
		switch {
		case r.regID == "":
			return nil, errors.New("cannot register with TPM attestation: no registration ID configured")
		case len(req.TPM.EndorsementKey) == 0 || len(req.TPM.StorageRootKey) == 0 || req.TPM.Activate == nil:
			return nil, errors.New("cannot register with TPM attestation: the endorsement key, storage root key or activation is missing")
		case transport != "" && transport != dial.TransportAuto && transport != dial.TransportHTTPS:
			return nil, fmt.Errorf("cannot register with TPM attestation over %s: DPS serves it over HTTPS only (transport %s or %s)", transport, dial.TransportHTTPS, dial.TransportAuto)
		}
		transport = dial.TransportHTTPS
	default:
		return nil, errors.New("cannot register: no certificate, no symmetric key and no TPM")
	}

	type tpmKeys struct {
		EndorsementKey []byte `json:"endorsementKey"` // base64, as DPS takes them
		StorageRootKey []byte `json:"storageRootKey"`
	}
	body := struct {
		RegistrationID string          `json:"registrationId"`
		TPM            *tpmKeys        `json:"tpm,omitempty"`
		Payload        json.RawMessage `json:"payload,omitempty"`
		CSR            string          `json:"csr,omitempty"`
	}{RegistrationID: r.regID}
	if req.TPM != nil {
		body.TPM = &tpmKeys{EndorsementKey: req.TPM.EndorsementKey, StorageRootKey: req.TPM.StorageRootKey}
	}
	if len(req.Payload) > 0 {
		var obj map[string]json.RawMessage
		if err := json.Unmarshal(req.Payload, &obj); err != nil || obj == nil {
			return nil, fmt.Errorf("custom allocation payload is not a JSON object: %s", req.Payload)
		}
		body.Payload = req.Payload
	}
	api := apiVersion
	if req.CSRSigner != nil {
		der, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{Subject: pkix.Name{CommonName: r.regID}}, req.CSRSigner)
		if err != nil {
			return nil, fmt.Errorf("cannot sign the certificate request: %w", err)
		}
		if body.CSR, err = encodeCSR(der); err != nil {
			return nil, err
		}
		r.csrPublic = req.CSRSigner.Public()
		api = apiVersionCSR
	}
	var err error
	if r.body, err = json.Marshal(body); err != nil {
		return nil, fmt.Errorf("cannot encode the registration request: %w", err)
	}
	r.apiVersion = api
	r.username = fmt.Sprintf("%s/registrations/%s/api-version=%s&ClientVersion=%s",
		req.IDScope, r.regID, api, url.QueryEscape(userAgent))
	r.dial = dial.Config{
		Host:        req.Endpoint,
		Transport:   transport,
		Prefer:      req.PreferTransport,
		HTTPS:       true,
		Proxy:       req.Proxy,
		RootCAs:     req.RootCAs,
		Certificate: req.Certificate,
	}
	return r, nil
}

// encodeCSR is the csr field: base64 DER, within the service's limit.
func encodeCSR(der []byte) (string, error) {
	b64 := base64.StdEncoding.EncodeToString(der)
	if len(b64) > maxCSR {
		return "", fmt.Errorf("cannot register: the certificate request is %d base64 characters, more than DPS takes (%d)", len(b64), maxCSR)
	}
	return b64, nil
}

func leafCN(c *tls.Certificate) (string, error) {
	leaf := c.Leaf
	if leaf == nil {
		if len(c.Certificate) == 0 {
			return "", errors.New("cannot register: the identity has no certificate")
		}
		var err error
		if leaf, err = x509.ParseCertificate(c.Certificate[0]); err != nil {
			return "", fmt.Errorf("cannot register: identity certificate: %w", err)
		}
	}
	return leaf.Subject.CommonName, nil
}

func (r *registration) run(ctx context.Context) (*Assignment, error) {
	for {
		a, err := r.session(ctx)
		if err == nil {
			return a, nil
		}
		var e *Error
		switch {
		case errors.As(err, &e) && e.Temporary():
			r.last = e
		case ctx.Err() == nil || !errors.Is(err, ctx.Err()):
			return nil, err // permanent
		}
		if ctx.Err() != nil {
			return nil, r.giveUp(ctx)
		}
		if err := r.pause(ctx, e); err != nil {
			return nil, r.giveUp(ctx)
		}
	}
}

// session connects once and registers or polls over that connection until DPS gives an
// outcome or the connection fails.
func (r *registration) session(ctx context.Context) (*Assignment, error) {
	c, transport, err := r.connect(ctx)
	if err != nil {
		return nil, err
	}
	defer c.close()
	for {
		rep, err := c.request(ctx, r.operationID)
		if err != nil {
			return nil, err
		}
		a, err := r.handle(rep)
		switch {
		case err != nil:
			var e *Error
			if !errors.As(err, &e) || !e.Temporary() {
				return nil, err
			}
			if err := r.pause(ctx, e); err != nil {
				return nil, err
			}
		case a != nil:
			a.Transport = transport
			return a, nil
		default:
			wait := r.pollInterval(rep)
			r.progress(Progress{Message: fmt.Sprintf("DPS is assigning a hub; polling in %s", seconds(wait)), Wait: wait})
			if err := r.sleep(ctx, wait); err != nil {
				return nil, err
			}
		}
	}
}

// handle reads one reply: an assignment, nil to poll again, or an error.
func (r *registration) handle(rep *reply) (*Assignment, error) {
	if rep.op == nil {
		if rep.status == 404 && r.operationID != "" {
			// DPS forgot the operation (expired, or another node): registering again is safe.
			r.operationID = ""
			return nil, &Error{Status: 404, Message: "DPS no longer knows the registration operation; registering again", temporary: true}
		}
		return nil, r.replyError(rep)
	}
	switch rep.op.Status {
	case statusAssigned:
		return r.assignment(rep.op.State)
	case statusFailed, statusDisabled:
		return nil, r.operationError(rep)
	}
	r.failures = 0
	if rep.op.OperationID != "" {
		r.operationID = rep.op.OperationID
	}
	return nil, nil
}

func (r *registration) assignment(st *registrationState) (*Assignment, error) {
	if st.RegistrationID != "" && !strings.EqualFold(st.RegistrationID, r.regID) {
		// Not this device's record: storing it would connect as someone else's device.
		return nil, malformed(fmt.Errorf("the assignment is for registration ID %s, this device is %s", quote(st.RegistrationID), quote(r.regID)))
	}
	a := &Assignment{
		AssignedHub:    st.AssignedHub,
		DeviceID:       st.DeviceID,
		Substatus:      st.Substatus,
		RegistrationID: st.RegistrationID,
		Payload:        st.Payload,
		CreatedAt:      st.CreatedAt,
		UpdatedAt:      st.UpdatedAt,
	}
	if a.RegistrationID == "" {
		a.RegistrationID = r.regID
	}
	if err := checkConnectionProfile(st); err != nil {
		return nil, err
	}
	if r.csrPublic != nil {
		if len(st.IssuedChain) == 0 {
			return nil, &Error{Message: fmt.Sprintf("DPS assigned hub %s without a certificate for the CSR (the enrollment has no credential policy)", st.AssignedHub), err: ErrNotIssued}
		}
		chain, err := orderIssuedChain(st.IssuedChain, r.csrPublic)
		if err != nil {
			r.operationID = "" // a new registration gets a new certificate
			return nil, malformed(err)
		}
		a.IssuedChain = chain
	}
	return a, nil
}

// checkConnectionProfile refuses an assignment to a hub this agent cannot speak to
// (certificates.md §1): absent, null and "classic" are MQTT 3.1.1, "mqttV5" is MQTT 5, and
// anything else is a terminal error, as for Microsoft's C client.
func checkConnectionProfile(st *registrationState) error {
	switch st.ConnectionProfile {
	case "", "classic":
		return nil
	case "mqttV5":
		return &Error{Message: fmt.Sprintf("DPS assigned hub %s (connectionProfile mqttV5)", st.AssignedHub), err: ErrMQTT5}
	}
	return &Error{Message: fmt.Sprintf("DPS assigned hub %s with connectionProfile %s", st.AssignedHub, quote(st.ConnectionProfile)), err: ErrConnectionProfile}
}

// orderIssuedChain puts the certificate for our key first and its issuers after it: DPS's
// order is documented (leaf first) but its only test vector has the reverse.
func orderIssuedChain(ders [][]byte, pub crypto.PublicKey) ([][]byte, error) {
	if len(ders) > maxIssuedChain {
		return nil, fmt.Errorf("the issued chain has %d certificates, more than %d", len(ders), maxIssuedChain)
	}
	certs := make([]*x509.Certificate, len(ders))
	leaf := -1
	for i, der := range ders {
		c, err := x509.ParseCertificate(der)
		if err != nil {
			return nil, fmt.Errorf("issued certificate %d: %w", i, err)
		}
		certs[i] = c
		if k, ok := c.PublicKey.(interface{ Equal(crypto.PublicKey) bool }); ok && k.Equal(pub) && leaf < 0 {
			leaf = i
		}
	}
	if leaf < 0 {
		return nil, errors.New("the certificate chain DPS issued has no certificate for this device's key")
	}
	used := make([]bool, len(certs))
	order := []int{leaf}
	used[leaf] = true
	for cur := certs[leaf]; ; {
		next := -1
		for i, c := range certs {
			if !used[i] && string(c.RawSubject) == string(cur.RawIssuer) {
				next = i
				break
			}
		}
		if next < 0 {
			break
		}
		order, used[next], cur = append(order, next), true, certs[next]
	}
	for i := range certs {
		if !used[i] {
			order = append(order, i)
		}
	}
	out := make([][]byte, len(order))
	for i, j := range order {
		out[i] = ders[j]
	}
	return out, nil
}

// pollInterval is how long to wait before polling: what DPS asked, but never under its
// 2 s limit; 2 s plus jitter when it did not say.
func (r *registration) pollInterval(rep *reply) time.Duration {
	if rep.hasRetryAfter {
		return max(rep.retryAfter, minPollInterval)
	}
	return minPollInterval + r.jitter(minPollInterval/2)
}

// pause waits before retrying after a temporary failure: exponential backoff with full
// jitter, capped, and never less than DPS's retry-after or, once DPS answered, its poll limit.
func (r *registration) pause(ctx context.Context, e *Error) error {
	ceiling := backoff.Ceiling(backoffBase, backoffCap, r.failures+1)
	wait := r.jitter(ceiling)
	if e.Status != 0 {
		wait = max(wait, minPollInterval)
	}
	wait = max(wait, e.RetryAfter)
	r.failures++
	r.last = e
	r.progress(Progress{Message: fmt.Sprintf("%s; retrying in %s", e.Message, seconds(wait)), Wait: wait, Err: e})
	return r.sleep(ctx, wait)
}

func (r *registration) sleep(ctx context.Context, d time.Duration) error {
	select {
	case <-r.clock.After(d):
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

func (r *registration) progress(p Progress) {
	if r.req.Progress != nil {
		r.req.Progress(p)
	}
}

// giveUp is the error of a call whose context ended: the last temporary error, if any (what
// a technician needs), joined with the context's.
func (r *registration) giveUp(ctx context.Context) error {
	if r.last == nil {
		return fmt.Errorf("cannot register with DPS: %w", context.Cause(ctx))
	}
	return fmt.Errorf("%w (gave up: %w)", r.last, context.Cause(ctx))
}

// challenged reports whether rep is TPM attestation's challenge that the TPM has yet to take.
func (r *registration) challenged(rep *reply) bool {
	return rep.status == 401 && rep.fail != nil && rep.fail.Challenge != nil && r.req.TPM != nil && r.signer == nil
}

// activate has the TPM take DPS's challenge; its identity key signs from then on.
func (r *registration) activate(ctx context.Context, authenticationKey []byte) error {
	signer, err := r.req.TPM.Activate(ctx, authenticationKey)
	switch {
	case ctx.Err() != nil:
		return ctx.Err()
	case err != nil:
		return fmt.Errorf("cannot answer DPS's TPM attestation challenge: %w", err)
	case signer == nil:
		return errors.New("cannot answer DPS's TPM attestation challenge: the TPM gave no identity key")
	}
	r.signer = signer
	r.progress(Progress{Message: "answered DPS's TPM attestation challenge: the identity key is in the TPM"})
	return nil
}

func seconds(d time.Duration) string {
	if d >= time.Second {
		return fmt.Sprintf("%d s", int(d.Round(time.Second)/time.Second))
	}
	return fmt.Sprintf("%.1f s", d.Seconds())
}

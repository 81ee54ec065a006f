package hub

import (
	"context"
	"crypto"
	"crypto/x509"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"net/url"
	"strconv"
	"strings"
	"sync/atomic"
	"time"

	mqtt "github.com/eclipse/paho.mqtt.golang"
)

// Certificate renewal through the hub over MQTT 3.1.1 (certificates.md §3): the session
// subscribes to the credentials responses when Config.CertificateRenewal is set, and
// IssueCertificate sends a CSR and waits for the chain. The MQTT 5 path is not defined yet.

const (
	credentialsResPrefix   = "$iothub/credentials/res/"
	issueCertificatePrefix = "$iothub/credentials/POST/issueCertificate/?$rid="
	// credentialsAPIVersion is the hub api-version of certificate management, sent in the
	// username of sessions that renew: what Microsoft's design doc pins and the Embedded C
	// SDK's CSR branch sends (certificates.md §3, protocol.md §4; the new C client's
	// username still says 2020-09-30).
	credentialsAPIVersion = "2025-08-01-preview"
	// DefaultIssueTimeout bounds the wait for the hub's first answer to IssueCertificate, and
	// after each 202 for the next: Microsoft's C client gives up after 2 minutes without a
	// terminal answer, and a 202 restarts that time. The service itself may keep an operation
	// open for about 12 hours.
	DefaultIssueTimeout = 120 * time.Second
	// maxCSR is the longest csr the hub takes, in base64 characters; maxIssuedChain the most
	// certificates Microsoft's C client takes in an answer (certificates.md §3).
	maxCSR         = 8192
	maxIssuedChain = 6
)

// Error codes of issueCertificate answers (certificates.md §3).
const (
	CodeBadCSR           = 400040
	CodeOperationActive  = 409005
	CodeNothingToReplace = 412001
	// codeOperationActiveOld is what the C# SDK's preview notes call CodeOperationActive.
	codeOperationActiveOld = 409004
)

// transientCodes may succeed when asked again later.
var transientCodes = map[int]bool{429002: true, 429003: true, 503001: true, 500001: true}

// Sentinels of certificate renewal, for errors.Is.
var (
	// ErrRenewalOff: the session was configured without CertificateRenewal, or the hub
	// refused the subscription to its certificate answers (it is not linked to certificate
	// management).
	ErrRenewalOff = errors.New("certificate renewal is not enabled on this session")
	// ErrRenewalBusy: IssueCertificate is already running on this session; one operation
	// at a time, as the hub allows.
	ErrRenewalBusy = errors.New("a certificate request is already in progress on this session")
	// ErrOperationActive: the hub has an operation for this device already (409005), one
	// this session gave up on, or another client's. Asking again with replace supersedes it.
	ErrOperationActive = errors.New("the hub has a certificate operation in progress for this device")
	// ErrNothingToReplace: replace was asked and the hub has no operation to replace (412001);
	// ask again without it.
	ErrNothingToReplace = errors.New("the hub has no certificate operation to replace")
	// ErrRequestLost: the connection ended before the hub acknowledged the request, so it
	// may or may not have it. Temporary; a later request may need replace.
	ErrRequestLost = errors.New("the connection to the hub ended before it acknowledged the certificate request")
)

// CertificateError is the hub's answer to a certificate request that did not bring a
// certificate, or an answer that could not be used.
type CertificateError struct {
	// Status is the status of the response topic: 4xx/5xx, or 200 for a chain that is not usable.
	Status int
	// ErrorCode is the hub's six-digit code (400040, 409005, 429002, …), zero if it gave none.
	ErrorCode int
	// RetryAfter is how long the hub asked the device to wait, zero if it did not say.
	RetryAfter time.Duration
	// Message is the hub's message, or what was wrong with its answer.
	Message string
}

func (e *CertificateError) Error() string {
	var b strings.Builder
	if e.Status == 200 {
		fmt.Fprintf(&b, "the hub answered the certificate request with an unusable chain: %s", e.Message)
		return b.String()
	}
	fmt.Fprintf(&b, "the hub refused the certificate request: status %d", e.Status)
	if e.ErrorCode != 0 {
		fmt.Fprintf(&b, ", error %d", e.ErrorCode)
	}
	if e.Message != "" {
		fmt.Fprintf(&b, ": hub says %q", e.Message)
	}
	if e.RetryAfter > 0 {
		fmt.Fprintf(&b, " (retry after %s)", e.RetryAfter)
	}
	return b.String()
}

// Temporary reports whether the same request may succeed later: the transient codes 429002,
// 429003, 503001 and 500001, other throttling and server errors, and an unusable chain (a
// new request gets a new one). 400040, 409005 and 412001 are permanent: the request itself
// must change (a new CSR, replace, or no replace).
func (e *CertificateError) Temporary() bool {
	switch {
	case transientCodes[e.ErrorCode], e.Status == 200:
		return true
	case e.ErrorCode == CodeBadCSR, e.ErrorCode == CodeOperationActive, e.ErrorCode == codeOperationActiveOld, e.ErrorCode == CodeNothingToReplace:
		return false
	}
	return e.Status == 429 || e.Status >= 500
}

// Is makes errors.Is(err, ErrOperationActive) and errors.Is(err, ErrNothingToReplace) true
// for those answers.
func (e *CertificateError) Is(target error) bool {
	switch target {
	case ErrOperationActive:
		return e.ErrorCode == CodeOperationActive || e.ErrorCode == codeOperationActiveOld
	case ErrNothingToReplace:
		return e.ErrorCode == CodeNothingToReplace
	}
	return false
}

// renewal is the one certificate request a session may have in flight.
type renewal struct {
	busy atomic.Bool
	// refused says the hub refused the subscription to the credentials responses on the
	// latest connection.
	refused atomic.Bool
	// The request's $rid and where its answers go, guarded by Client.mu: the first
	// terminal answer, and each 202.
	rid      string
	final    chan response
	accepted chan struct{}
	// gotAccepted says a 202 came, which tells as well as a PUBACK that the hub has the
	// request (it answers before it acknowledges).
	gotAccepted bool
}

// requestAccepted reports whether the hub answered the request in flight with 202.
func (c *Client) requestAccepted() bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.renewal.gotAccepted
}

// IssueCertificate asks the hub for a certificate for csr, a DER PKCS#10 request signed by
// the new key, and returns the chain the hub issued, DER, leaf (for the CSR's key) first.
// replace supersedes an operation the hub still has open for the device (after
// ErrOperationActive). The session must have been configured with CertificateRenewal, and
// one call runs at a time (ErrRenewalBusy). It waits for the connection, publishes the
// request once, and waits for the answer across reconnects until IssueTimeout passes
// without one (each 202 restarts it; then ErrTimeout) or ctx ends. The hub's refusals are
// *CertificateError; the new certificate is for the next connection, this one stays up.
func (c *Client) IssueCertificate(ctx context.Context, csr []byte, replace bool) ([][]byte, error) {
	const op = "request a certificate"
	if !c.cfg.CertificateRenewal {
		return nil, fmt.Errorf("cannot %s: %w", op, ErrRenewalOff)
	}
	if c.renewal.refused.Load() {
		return nil, fmt.Errorf("cannot %s: hub %s refused the subscription to %s#: %w", op, c.cfg.Hub, credentialsResPrefix, ErrRenewalOff)
	}
	req, err := x509.ParseCertificateRequest(csr)
	if err != nil {
		return nil, fmt.Errorf("cannot %s: not a PKCS#10 request: %w", op, err)
	}
	body := struct {
		ID      string `json:"id"`
		CSR     string `json:"csr"`
		Replace string `json:"replace,omitempty"`
	}{ID: c.cfg.DeviceID, CSR: base64.StdEncoding.EncodeToString(csr)}
	if len(body.CSR) > maxCSR {
		return nil, fmt.Errorf("cannot %s: the CSR is %d base64 characters, more than the hub takes (%d)", op, len(body.CSR), maxCSR)
	}
	if replace {
		body.Replace = "*"
	}
	payload, err := json.Marshal(body)
	if err != nil {
		return nil, fmt.Errorf("cannot %s: %w", op, err)
	}
	if !c.renewal.busy.CompareAndSwap(false, true) {
		return nil, fmt.Errorf("cannot %s: %w", op, ErrRenewalBusy)
	}
	defer c.renewal.busy.Store(false)

	rid := c.newRID()
	final, accepted := make(chan response, 1), make(chan struct{}, 1)
	c.mu.Lock()
	c.renewal.rid, c.renewal.final, c.renewal.accepted = rid, final, accepted
	c.mu.Unlock()
	defer func() {
		c.mu.Lock()
		c.renewal.rid, c.renewal.final, c.renewal.accepted, c.renewal.gotAccepted = "", nil, nil, false
		c.mu.Unlock()
	}()
	ctx, cancel := context.WithCancelCause(ctx)
	defer cancel(nil)
	go c.issueDeadline(ctx, cancel, accepted)

	fail := func(err error) ([][]byte, error) {
		if cause := context.Cause(ctx); errors.Is(cause, ErrTimeout) {
			return nil, cause
		}
		return nil, fmt.Errorf("cannot %s: %w", op, err)
	}

	var cn *conn
	for {
		if cn, err = c.nextConn(ctx, cn); err != nil {
			return fail(err)
		}
		chain, sent, err := c.sendIssue(ctx, cn, rid, payload, final, req.PublicKey)
		var ce *CertificateError
		switch {
		case ctx.Err() != nil:
			return fail(ctx.Err())
		case !sent: // the connection ended before the request went out: it goes on the next one
		case err == nil, errors.As(err, &ce):
			return chain, err
		default:
			return fail(err)
		}
	}
}

// sendIssue publishes the request on cn and waits for its answer, across reconnects once
// the hub has it. sent is false when the request certainly did not leave: cn was gone
// before it was tried, or paho refused it at once. Once it may have left it is never sent
// again: a second request would be a second operation at the hub.
func (c *Client) sendIssue(ctx context.Context, cn *conn, rid string, payload []byte, final <-chan response, pub crypto.PublicKey) (chain [][]byte, sent bool, err error) {
	select {
	case <-cn.lost:
		return nil, false, cn.cause()
	default:
	}
	mc := cn.mc
	tok, err := c.handoff(ctx, cn, func() mqtt.Token { return mc.Publish(issueCertificatePrefix+rid, 1, false, payload) })
	if err != nil {
		return nil, true, fmt.Errorf("%w: %w", ErrRequestLost, err)
	}
	// requestLost ends the wait when the connection went before the hub said it has the
	// request (a PUBACK, or a 202, which comes first), unless its answer came just before.
	requestLost := func(err error) ([][]byte, bool, error) {
		select {
		case r := <-final:
			chain, err := issuedChain(r, pub)
			return chain, true, err
		default:
			return nil, true, err
		}
	}
	published, lost := tok.Done(), cn.lost
	for {
		select {
		case r := <-final:
			chain, err := issuedChain(r, pub)
			return chain, true, err
		case <-published:
			published = nil
			err := tok.Error()
			switch {
			case errors.Is(err, mqtt.ErrNotConnected):
				return nil, false, err // paho had let the connection go: nothing was sent
			case err != nil:
				cn.end(fmt.Errorf("cannot publish a certificate request: %w", err))
				if !c.requestAccepted() {
					return requestLost(fmt.Errorf("%w: %w", ErrRequestLost, err))
				}
			}
			lost = nil // the hub has it: the answer may come on a later connection
		case <-lost:
			lost = nil
			if !c.requestAccepted() {
				return requestLost(ErrRequestLost)
			}
		case <-ctx.Done():
			return nil, true, ctx.Err()
		}
	}
}

// issueDeadline cancels ctx with ErrTimeout once IssueTimeout passes without an answer;
// each 202 on accepted starts the time again.
func (c *Client) issueDeadline(ctx context.Context, cancel context.CancelCauseFunc, accepted <-chan struct{}) {
	for {
		select {
		case <-c.cfg.Clock.After(c.cfg.IssueTimeout):
			cancel(fmt.Errorf("cannot request a certificate: no answer within %s: %w", c.cfg.IssueTimeout, ErrTimeout))
			return
		case <-accepted:
		case <-ctx.Done():
			return
		}
	}
}

// issuedChain reads a terminal answer: the chain of a 200 (an object with "certificates", or
// the bare array of older previews), or the error of anything else.
func issuedChain(r response, pub crypto.PublicKey) ([][]byte, error) {
	if r.status != 200 {
		var body struct {
			ErrorCode  int    `json:"errorCode"`
			RetryAfter int    `json:"retryAfter"`
			Message    string `json:"message"`
		}
		_ = json.Unmarshal(r.body, &body) // the status says enough without it
		return nil, &CertificateError{Status: r.status, ErrorCode: body.ErrorCode,
			RetryAfter: time.Duration(max(body.RetryAfter, 0)) * time.Second, Message: body.Message}
	}
	unusable := func(format string, a ...any) error {
		return &CertificateError{Status: 200, Message: fmt.Sprintf(format, a...)}
	}
	var certs []string
	var obj struct {
		Certificates []string `json:"certificates"`
	}
	if err := json.Unmarshal(r.body, &obj); err == nil {
		certs = obj.Certificates
	} else if err := json.Unmarshal(r.body, &certs); err != nil {
		return nil, unusable("the body is neither {\"certificates\":[…]} nor an array: %v", err)
	}
	switch {
	case len(certs) == 0:
		return nil, unusable("no certificate")
	case len(certs) > maxIssuedChain:
		return nil, unusable("%d certificates, more than %d", len(certs), maxIssuedChain)
	}
	ders := make([][]byte, len(certs))
	for i, s := range certs {
		der, err := base64.StdEncoding.DecodeString(s)
		if err != nil {
			return nil, unusable("certificate %d is not base64: %v", i, err)
		}
		c, err := x509.ParseCertificate(der)
		if err != nil {
			return nil, unusable("certificate %d: %v", i, err)
		}
		if i == 0 {
			if k, ok := pub.(interface{ Equal(crypto.PublicKey) bool }); !ok || !k.Equal(c.PublicKey) {
				return nil, unusable("the first certificate is not for the CSR's key")
			}
		}
		ders[i] = der
	}
	return ders, nil
}

// credentialsResponse hands an answer on $iothub/credentials/res/{status}/?$rid={rid} to the
// request waiting for it (the design doc writes res/{status}/{rid}: both are read); others
// are dropped.
func (c *Client) credentialsResponse(topic string, body []byte) {
	statusText, tail, _ := strings.Cut(strings.TrimPrefix(topic, credentialsResPrefix), "/")
	status, err := strconv.Atoi(statusText)
	if err != nil {
		return
	}
	rid := tail
	if q, ok := strings.CutPrefix(tail, "?"); ok {
		v, _ := url.ParseQuery(q)
		rid = v.Get("$rid")
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.renewal.final == nil || rid != c.renewal.rid {
		return
	}
	if status == 202 {
		c.renewal.gotAccepted = true
		select {
		case c.renewal.accepted <- struct{}{}:
		default: // a restart is pending already
		}
		return
	}
	select {
	case c.renewal.final <- response{status: status, body: body}:
	default: // the first terminal answer counts
	}
}

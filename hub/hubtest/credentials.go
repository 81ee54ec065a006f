package hubtest

import (
	"bytes"
	"crypto/rand"
	"crypto/sha256"
	"crypto/x509"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"net/url"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/unicity-iot/unicity/dps/dpstest"
	"github.com/unicity-iot/unicity/internal/certcodec"
	"github.com/unicity-iot/unicity/internal/mqttsrv"
)

// Certificate renewal through the hub (certificates.md §3): a device subscribed to
// $iothub/credentials/res/# publishes a CSR to issueCertificate; the hub answers 202, then 200
// with the chain its Issuer signed, and from then on accepts the new certificate. Azure's
// hub trusts the issuing CA it synced from Device Registry; this one registers each issued
// leaf with the device instead, which accepts the same certificates, each until it expires,
// and lets an operator revoke one (Azure's preview cannot: it disables the device).

const (
	credentialsResFilter  = "$iothub/credentials/res/#"
	credentialsResPrefix  = "$iothub/credentials/res/"
	issueCertificateTopic = "$iothub/credentials/POST/issueCertificate/"
	subCredentials        = "credentials"
	// maxCSRBase64 is the service's limit on the csr field.
	maxCSRBase64 = 8192
	// operationLifetime is how long Azure keeps an operation open (operationExpires).
	operationLifetime = 12 * time.Hour
)

// Error codes of issueCertificate (certificates.md §3).
const (
	CodeBadCSR           = 400040 // permanent: the CSR is malformed or the policy refuses it
	CodeOperationActive  = 409005 // permanent: an operation is active; send replace
	CodeNothingToReplace = 412001 // permanent: replace given, no operation to replace
	CodeThrottled        = 429002 // transient
	CodeUnavailable      = 503001 // transient
	CodeInternal         = 500001 // transient
)

// ErrNotIssued is returned by Revoke for a device without such an operational certificate.
var ErrNotIssued = errors.New("no such operational certificate")

// Issuer signs the CSRs devices send to issueCertificate under their enrollment's credential
// policy, as Azure Device Registry does for the hub; *dpstest.Server is one. Its errors
// matching dpstest.ErrCSRRejected or dpstest.ErrNoCredentialPolicy are answered 400040,
// dpstest.ErrNotFound 404001, anything else 500001.
type Issuer interface {
	IssueCertificate(deviceID string, csr *x509.CertificateRequest) ([]*x509.Certificate, error)
}

var _ Issuer = (*dpstest.Server)(nil)

// IssueFault scripts the hub's answer to issueCertificate requests. The zero value is the
// normal answer.
type IssueFault struct {
	// Status and ErrorCode, when Status is set, answer the request with this error instead
	// of a certificate; RetryAfter goes in the body when positive.
	Status, ErrorCode int
	RetryAfter        time.Duration
	// Accepted sends 202 before the error, as a failure while signing would.
	Accepted bool
	// Silent answers 202 and nothing after: the operation stays active, the device times out.
	Silent bool
	// Delay holds the final answer that long after the 202.
	Delay time.Duration
	// Drop closes the connection instead of answering, before acknowledging the request.
	Drop bool
	// Unsynced issues the certificate without the hub accepting it at CONNECT, as a hub
	// whose namespace credentials are not synced yet would (certificates.md §1).
	Unsynced bool
}

// credentials is the hub's renewal state, guarded by Hub.mu.
type credentials struct {
	issuer     Issuer
	ops        map[string]*issueOp // by device ID: the active operation
	fault      IssueFault
	faultsLeft int // requests fault still applies to; < 0 for all
}

// issueOp is an active issueCertificate operation.
type issueOp struct{ rid string }

// CertificateInfo is an operational certificate as the controls report it.
type CertificateInfo struct {
	Thumbprint string    `json:"sha256_thumbprint"`
	NotBefore  time.Time `json:"not_before"`
	NotAfter   time.Time `json:"not_after"`
}

// SetIssuer makes the hub serve issueCertificate with i. A hub without one is not linked to
// certificate management: it refuses the subscription to $iothub/credentials/res/# and
// answers requests 400040.
func (h *Hub) SetIssuer(i Issuer) {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.creds.issuer = i
}

// SetIssuer sets the issuer of every hub of the fleet.
func (f *Fleet) SetIssuer(i Issuer) {
	for _, h := range f.Hubs() {
		h.SetIssuer(i)
	}
}

// FailIssue answers the next n issueCertificate requests, from any device, as f says (n <= 0:
// every request until the next FailIssue). FailIssue(0, IssueFault{}) restores the normal
// answer.
func (h *Hub) FailIssue(n int, f IssueFault) {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.creds.fault, h.creds.faultsLeft = f, n
	if n <= 0 {
		h.creds.faultsLeft = -1
	}
}

// takeFault consumes one scripted answer; h.mu is held.
func (h *Hub) takeFault() IssueFault {
	c := &h.creds
	if c.faultsLeft == 0 {
		return IssueFault{}
	}
	if c.faultsLeft > 0 {
		c.faultsLeft--
	}
	return c.fault
}

// Revoke withdraws the device's operational certificate with this SHA-256 thumbprint (any
// case), or all of them when thumbprint is empty, and closes its connection if it used one
// of them: the hub refuses them at CONNECT from then on (return code 5). It returns what it
// revoked.
func (h *Hub) Revoke(deviceID, thumbprint string) ([]CertificateInfo, error) {
	h.mu.Lock()
	defer h.mu.Unlock()
	d, err := h.lookup(deviceID)
	if err != nil {
		return nil, err
	}
	var revoked []CertificateInfo
	d.Issued = slices.DeleteFunc(d.Issued, func(c *x509.Certificate) bool {
		if thumbprint != "" && !strings.EqualFold(certcodec.Thumbprint(c), thumbprint) {
			return false
		}
		revoked = append(revoked, certificateInfo(c))
		return true
	})
	if len(revoked) == 0 {
		what := "any operational certificate"
		if thumbprint != "" {
			what = "operational certificate " + thumbprint
		}
		return nil, fmt.Errorf("%w: device %q has no %s", ErrNotIssued, deviceID, what)
	}
	if d.conn != nil && d.conn.TLS != nil && len(d.conn.TLS.PeerCertificates) > 0 {
		in := certcodec.Thumbprint(d.conn.TLS.PeerCertificates[0])
		if slices.ContainsFunc(revoked, func(r CertificateInfo) bool { return r.Thumbprint == in }) {
			h.kick(d)
		}
	}
	h.broadcast()
	return revoked, h.save(d)
}

func certificateInfo(c *x509.Certificate) CertificateInfo {
	return CertificateInfo{Thumbprint: certcodec.Thumbprint(c), NotBefore: c.NotBefore.UTC(), NotAfter: c.NotAfter.UTC()}
}

// issuedInfo lists certificates for DeviceInfo.
func issuedInfo(certs []*x509.Certificate) []CertificateInfo {
	var out []CertificateInfo
	for _, c := range certs {
		out = append(out, certificateInfo(c))
	}
	return out
}

// mergeIssued is what the device holds after more certificates were issued to it: the
// earlier ones still valid at now, then the new ones, each once.
func mergeIssued(old, added []*x509.Certificate, now time.Time) []*x509.Certificate {
	var out []*x509.Certificate
	for _, c := range slices.Concat(old, added) {
		if now.After(c.NotAfter) || slices.ContainsFunc(out, c.Equal) {
			continue
		}
		out = append(out, c)
	}
	return out
}

// authenticateIssued accepts a leaf that is one of the device's operational certificates.
func (d *device) authenticateIssued(leaf *x509.Certificate, now time.Time) error {
	for _, c := range d.Issued {
		if !c.Equal(leaf) {
			continue
		}
		if now.Before(c.NotBefore) || now.After(c.NotAfter) {
			return fmt.Errorf("operational certificate outside its validity period (%s to %s)", c.NotBefore, c.NotAfter)
		}
		return nil
	}
	sum := sha256.Sum256(leaf.Raw)
	return fmt.Errorf("certificate %s is not an operational certificate of the device (never issued, expired or revoked)", strings.ToUpper(hex.EncodeToString(sum[:])))
}

// issueRequest is the issueCertificate body.
type issueRequest struct {
	ID      string  `json:"id"`
	CSR     string  `json:"csr"`
	Replace *string `json:"replace"`
}

// issueCertificate serves one issueCertificate request.
func (h *Hub) issueCertificate(c *mqttsrv.Conn, d *device, topic string, payload []byte) error {
	rid := ridOf(topic)
	if rid == "" {
		return h.violation(fmt.Errorf("issueCertificate without $rid: %q", topic))
	}
	reply := func(status int, body []byte) { h.respond(c, d, subCredentials, credentialsTopic(status, rid), body) }
	var req issueRequest
	dec := json.NewDecoder(bytes.NewReader(payload))
	if err := dec.Decode(&req); err != nil {
		reply(400, errorBody(400004, "the request body is not JSON: "+err.Error(), 0))
		return nil
	}
	if req.ID != d.ID {
		reply(400, errorBody(400004, fmt.Sprintf("id %q is not this device's, %q", req.ID, d.ID), 0))
		return nil
	}
	csr, err := parseIssueCSR(req.CSR)
	if err != nil {
		reply(400, errorBody(CodeBadCSR, err.Error(), 0))
		return nil
	}

	h.mu.Lock()
	if h.creds.ops == nil {
		h.creds.ops = map[string]*issueOp{}
	}
	active := h.creds.ops[d.ID]
	var status, code int
	var msg string
	switch {
	case req.Replace == nil && active != nil:
		status, code, msg = 409, CodeOperationActive, "an issueCertificate operation is active for the device; send replace to supersede it"
	case req.Replace != nil && (active == nil || (*req.Replace != "*" && *req.Replace != active.rid)):
		status, code, msg = 412, CodeNothingToReplace, fmt.Sprintf("no active operation matches replace %q", *req.Replace)
	}
	if status != 0 {
		h.mu.Unlock()
		reply(status, errorBody(code, msg, 0))
		return nil
	}
	f := h.takeFault()
	if f.Drop {
		h.mu.Unlock()
		return errors.New("hubtest: connection dropped by a scripted fault (FailIssue)")
	}
	if f.Status != 0 && !f.Accepted {
		h.mu.Unlock()
		reply(f.Status, errorBody(f.ErrorCode, "scripted fault (FailIssue)", f.RetryAfter))
		return nil
	}
	op := &issueOp{rid: rid}
	h.creds.ops[d.ID] = op // supersedes the one replaced, whose answer never comes
	issuer := h.creds.issuer
	h.mu.Unlock()

	accepted, _ := json.Marshal(map[string]string{"correlationId": rand.Text(),
		"operationExpires": h.now().Add(operationLifetime).UTC().Format(time.RFC3339)})
	reply(202, accepted)
	if f.Silent {
		return nil
	}
	// An operation whose connection ends first stays active, as Azure's lasts until
	// operationExpires: the device replaces it.
	h.after(f.Delay, c, func() {
		status, body, leaf := 0, []byte(nil), (*x509.Certificate)(nil)
		if f.Status != 0 {
			status, body = f.Status, errorBody(f.ErrorCode, "scripted fault (FailIssue)", f.RetryAfter)
		} else {
			status, body, leaf = issueWith(issuer, d.ID, csr)
		}
		h.mu.Lock()
		if h.creds.ops[d.ID] != op {
			h.mu.Unlock()
			return // replaced meanwhile
		}
		delete(h.creds.ops, d.ID)
		if leaf != nil && !f.Unsynced {
			held := d.Issued
			d.Issued = mergeIssued(d.Issued, []*x509.Certificate{leaf}, h.now())
			if err := h.save(d); err != nil { // a certificate the hub would forget on restart
				d.Issued = held
				status, body = 500, errorBody(CodeInternal, "cannot save the certificate: "+err.Error(), 0)
			}
		}
		cn := d.conn
		h.broadcast()
		h.mu.Unlock()
		if cn != nil {
			h.respond(cn, d, subCredentials, credentialsTopic(status, rid), body)
		}
	})
	return nil
}

// issueWith asks the issuer and returns the answer to send and, on success, the new leaf.
func issueWith(issuer Issuer, deviceID string, csr *x509.CertificateRequest) (int, []byte, *x509.Certificate) {
	if issuer == nil {
		return 400, errorBody(CodeBadCSR, "certificate management is not enabled on this hub", 0), nil
	}
	chain, err := issuer.IssueCertificate(deviceID, csr)
	switch {
	case errors.Is(err, dpstest.ErrCSRRejected), errors.Is(err, dpstest.ErrNoCredentialPolicy):
		return 400, errorBody(CodeBadCSR, err.Error(), 0), nil
	case errors.Is(err, dpstest.ErrNotFound):
		return 404, errorBody(404001, err.Error(), 0), nil
	case err != nil:
		return 500, errorBody(CodeInternal, err.Error(), 0), nil
	}
	certs := make([]string, len(chain))
	for i, c := range chain {
		certs[i] = base64.StdEncoding.EncodeToString(c.Raw)
	}
	body, _ := json.Marshal(map[string]any{"certificates": certs})
	return 200, body, chain[0]
}

func parseIssueCSR(field string) (*x509.CertificateRequest, error) {
	if len(field) > maxCSRBase64 {
		return nil, fmt.Errorf("csr is %d base64 characters, more than %d", len(field), maxCSRBase64)
	}
	der, err := base64.StdEncoding.DecodeString(field)
	if err != nil || len(der) == 0 {
		return nil, errors.New("csr is not base64 DER")
	}
	csr, err := x509.ParseCertificateRequest(der)
	if err != nil {
		return nil, fmt.Errorf("csr is not a PKCS#10 request: %w", err)
	}
	if err := csr.CheckSignature(); err != nil {
		return nil, fmt.Errorf("csr signature is invalid: %w", err)
	}
	return csr, nil
}

// errorBody is an issueCertificate error answer: errorCode and, when positive, retryAfter in
// whole seconds, which is what clients read (certificates.md §3).
func errorBody(code int, msg string, retryAfter time.Duration) []byte {
	b := map[string]any{"errorCode": code, "message": msg}
	if retryAfter > 0 {
		b["retryAfter"] = int((retryAfter + time.Second - 1) / time.Second)
	}
	body, _ := json.Marshal(b)
	return body
}

func credentialsTopic(status int, rid string) string {
	return credentialsResPrefix + strconv.Itoa(status) + "/?$rid=" + url.QueryEscape(rid)
}

// ridOf reads $rid from a request topic's query.
func ridOf(topic string) string {
	_, query, _ := strings.Cut(topic, "?")
	q, _ := url.ParseQuery(query)
	return q.Get("$rid")
}

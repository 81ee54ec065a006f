package dpstest

import (
	"bytes"
	"crypto/tls"
	"crypto/x509"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"net/url"
	"regexp"
	"strconv"
	"strings"
	"time"

	"github.com/eclipse/paho.mqtt.golang/packets"

	"github.com/unicity-iot/unicity/internal/mqttsrv"
	"github.com/unicity-iot/unicity/internal/uuid"
)

// Topics of the device API (protocol.md §2.1).
const (
	responseFilter = "$dps/registrations/res/#"
	registerTopic  = "$dps/registrations/PUT/iotdps-register/"
	pollTopic      = "$dps/registrations/GET/iotdps-get-operationstatus/"
)

// csrAPIVersion is the first api-version whose register request may carry a CSR.
const csrAPIVersion = "2025-07-01-preview"

// noRetryAfter leaves retry-after out of a response.
const noRetryAfter time.Duration = -1

var (
	apiVersionRE = regexp.MustCompile(`^\d{4}-\d{2}-\d{2}(-preview)?$`)
	// registrationIDRE is DOC-X509's rule, applied to the lower-cased ID.
	registrationIDRE = regexp.MustCompile(`^[a-z0-9._:-]*[a-z0-9-]$`)
	errDropped       = errors.New("dpstest: connection dropped by a scripted fault")
)

// handler serves the device API; it is the Server seen by mqttsrv.
type handler Server

// connState is what a connection has established.
type connState struct {
	regID, apiVersion string
	sas               bool        // authenticated by SAS token rather than certificate
	enroll            *enrollment // nil when the device was not admitted (Refuse401)
	refusal           string
	subQoS            int // -1 until the response filter is subscribed
}

// parseUsername splits "{scope}/registrations/{regId}/api-version=…[&ClientVersion=…]"
// (protocol.md §1.2), tolerating extra keys and encoded or raw values.
func parseUsername(u string) (scope, regID, apiVersion string, err error) {
	scope, rest, ok := strings.Cut(u, "/registrations/")
	if !ok || scope == "" {
		return "", "", "", fmt.Errorf("username %q is not {idScope}/registrations/{registrationId}/api-version=…", u)
	}
	regID, query, ok := strings.Cut(rest, "/")
	if !ok || regID == "" {
		return "", "", "", fmt.Errorf("username %q has no registration ID", u)
	}
	for _, kv := range strings.Split(query, "&") {
		if k, v, _ := strings.Cut(kv, "="); k == "api-version" {
			apiVersion = v
		}
	}
	if !apiVersionRE.MatchString(apiVersion) {
		return "", "", "", fmt.Errorf("username %q has no valid api-version", u)
	}
	return scope, regID, apiVersion, nil
}

func (h *handler) Connect(c *mqttsrv.Conn) (byte, bool) {
	s := (*Server)(h)
	scope, regID, apiVersion, err := parseUsername(c.Username)
	if f := s.fault(StepConnect, regID); f != nil {
		switch f.Action {
		case Drop:
			c.Close()
			return packets.ErrRefusedServerUnavailable, false
		case Status:
			if f.Status <= 0 || f.Status > 255 {
				return packets.ErrRefusedNotAuthorised, false // a fault never accepts
			}
			return byte(f.Status), false
		case Delay:
			if !s.sleep(c.Done(), f.Delay) {
				return packets.ErrRefusedServerUnavailable, false
			}
		}
	}
	if err != nil {
		s.stats.refused.Add(1)
		s.log.Info("refused connection", "client", c.ClientID, "err", err)
		return packets.ErrRefusedBadUsernameOrPassword, false
	}
	if !s.knownScope(scope, regID) {
		return packets.ErrRefusedServerUnavailable, false
	}
	var password []byte
	if len(c.Password) > 0 { // ESDK-C sends an empty password with X.509
		password = c.Password
	}
	st := s.admit(regID, apiVersion, password, c.TLS)
	if st.enroll == nil {
		s.stats.refused.Add(1)
		s.log.Info("unknown device", "registration", regID, "reason", st.refusal)
		if s.cfg.UnknownDevice == RefuseConnack {
			return packets.ErrRefusedNotAuthorised, false
		}
	}
	c.Value = st
	s.stats.connections.Add(1)
	return packets.Accepted, false
}

// knownScope reports whether scope is this instance's. DPS finds the instance by its ID scope
// before it looks at credentials, and answers an unknown scope with "server unavailable"
// (Azure/azure-iot-sdk-python#670).
func (s *Server) knownScope(scope, regID string) bool {
	if strings.EqualFold(scope, s.cfg.IDScope) {
		return true
	}
	s.stats.refused.Add(1)
	s.log.Info("refused connection", "registration", regID, "reason", fmt.Sprintf("ID scope %q is not this service's", scope))
	return false
}

// admit authenticates a device for the requests that follow: over MQTT once per connection,
// over HTTPS once per request. A device it refuses gets a state without enrollment, and its
// requests are answered 401.
func (s *Server) admit(regID, apiVersion string, password []byte, tlsState *tls.ConnectionState) *connState {
	st := &connState{regID: regID, apiVersion: apiVersion, sas: password != nil, subQoS: -1}
	var peer []*x509.Certificate
	if tlsState != nil {
		peer = tlsState.PeerCertificates
	}
	st.enroll, st.refusal = s.authenticate(regID, password, peer)
	return st
}

func (h *handler) Subscribe(c *mqttsrv.Conn, filters []string, qos []byte) []byte {
	s := (*Server)(h)
	st := c.Value.(*connState)
	codes := make([]byte, len(filters))
	f := s.fault(StepSubscribe, st.regID)
	if f != nil && f.Action == Drop {
		c.Close()
	}
	for i, filter := range filters {
		if filter != responseFilter || (f != nil && f.Action == Status) {
			codes[i] = 0x80
			continue
		}
		codes[i] = min(qos[i], 1) // DPS grants QoS 1 for a QoS 2 request
		st.subQoS = int(codes[i])
	}
	return codes
}

func (h *handler) Disconnected(c *mqttsrv.Conn, err error) {
	(*Server)(h).log.Debug("disconnected", "registration", c.Value.(*connState).regID, "err", err)
}

// reply is one response to a device request, with what the register requests' history
// records of it.
type reply struct {
	status     int
	body       []byte
	retryAfter time.Duration // noRetryAfter leaves it out

	outcome, reason string
	code            int        // the error code of an error answer
	op              *operation // the operation a register started
	err             error      // the Journal failed: close the connection instead of answering
}

func (h *handler) Publish(c *mqttsrv.Conn, m mqttsrv.Message) error {
	s := (*Server)(h)
	st := c.Value.(*connState)
	if m.QoS > 1 {
		return fmt.Errorf("dpstest: QoS %d publish", m.QoS)
	}
	if s.cfg.MaxMessageSize > 0 && len(m.Payload) > s.cfg.MaxMessageSize {
		return fmt.Errorf("dpstest: message of %d bytes exceeds the limit of %d", len(m.Payload), s.cfg.MaxMessageSize)
	}
	path, query, _ := strings.Cut(m.Topic, "?")
	var rid, opID string
	for _, kv := range strings.Split(query, "&") {
		switch k, v, _ := strings.Cut(kv, "="); k {
		case "$rid":
			rid = v // echoed verbatim, as sent
		case "operationId":
			opID = v
		}
	}
	var step Step
	switch path {
	case registerTopic:
		step = StepRegister
		s.stats.registrations.Add(1)
	case pollTopic:
		step = StepPoll
		s.stats.polls.Add(1)
	default:
		return fmt.Errorf("dpstest: unsupported topic %q", m.Topic) // DPS is not a broker
	}

	f := s.fault(step, st.regID)
	if f != nil && f.Action == Drop {
		return errDropped
	}
	if unescaped, err := url.QueryUnescape(opID); err == nil {
		opID = unescaped
	}
	r, err := s.answer(st, step, f, m.Payload, opID)
	if err != nil {
		return err
	}
	if f != nil {
		switch f.Action {
		case WrongRID:
			rid = "not-" + rid
		case Delay:
			qos := st.subQoS // read here: the connection's goroutine owns st
			s.wg.Add(1)
			go func() {
				defer s.wg.Done()
				if s.sleep(c.Done(), f.Delay) {
					s.send(c, qos, rid, r)
				}
			}()
			return nil
		}
	}
	s.send(c, st.subQoS, rid, r)
	if f != nil && f.Action == DropAfterReply {
		return errDropped
	}
	return nil
}

// answer is the reply to a register or poll request, as a fault that fires changes it:
// Status replaces it, Malformed and Oversized spoil its body after the register requests'
// history has noted it. An error means the Journal failed: the connection is closed instead.
func (s *Server) answer(st *connState, step Step, f *Fault, body []byte, opID string) (reply, error) {
	var r reply
	switch {
	case f != nil && f.Action == Status:
		r = s.errorReply(f.Status, f.Status*1000, "scripted fault", noRetryAfter)
		if f.RetryAfter > 0 {
			r.retryAfter = f.RetryAfter
		}
	case step == StepRegister:
		r = s.register(st, body)
	default:
		r = s.poll(st, opID)
	}
	if step == StepRegister {
		s.mu.Lock()
		err := s.noteRegisterLocked(st.regID, r)
		s.mu.Unlock()
		if err != nil {
			return r, err
		}
	}
	if r.err != nil {
		return r, r.err
	}
	if f != nil {
		switch f.Action {
		case Malformed:
			r.body = r.body[:len(r.body)/2]
		case Oversized:
			r.body = oversize(r.body, s.cfg.MaxMessageSize)
		}
	}
	return r, nil
}

// sleep waits d unless done (the connection's or the request's end) or the server's end
// comes first; it reports whether the wait completed.
func (s *Server) sleep(done <-chan struct{}, d time.Duration) bool {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return true
	case <-done:
	case <-s.closing:
	}
	return false
}

// send publishes a response on the response topic at the subscription's QoS, $rid first and
// retry-after lower case (protocol.md §2.4). Like the service, it drops it when the device
// has not subscribed (qos < 0).
func (s *Server) send(c *mqttsrv.Conn, qos int, rid string, r reply) {
	if qos < 0 {
		return
	}
	topic := "$dps/registrations/res/" + strconv.Itoa(r.status) + "/?$rid=" + rid
	if r.retryAfter >= 0 {
		topic += "&retry-after=" + retryAfterSeconds(r.retryAfter)
	}
	c.Publish(mqttsrv.Message{Topic: topic, QoS: byte(qos), Payload: r.body})
}

// retryAfterSeconds is retry-after as DPS sends it: whole seconds, rounded up.
func retryAfterSeconds(d time.Duration) string {
	return strconv.Itoa(int((d + time.Second - 1) / time.Second))
}

// errorReply is a request-level error (protocol.md §3.3).
func (s *Server) errorReply(status, code int, msg string, retryAfter time.Duration) reply {
	outcome := OutcomeError
	switch {
	case status == 429:
		s.stats.throttled.Add(1)
		outcome = OutcomeThrottled
	case status == 401:
		outcome = OutcomeRefused
	case status == 400:
		outcome = OutcomeRejected
	}
	body, _ := json.Marshal(struct {
		ErrorCode    int    `json:"errorCode"`
		TrackingID   string `json:"trackingId"`
		Message      string `json:"message"`
		TimestampUTC string `json:"timestampUtc"`
	}{code, uuid.New(), msg, dpsTime(s.cfg.Now())})
	return reply{status: status, body: body, retryAfter: retryAfter, outcome: outcome, reason: msg, code: code}
}

// refuse answers 401 with the service's words for the device's attestation, which never say
// why: "Invalid certificate." for X.509 (ESDK-C's vector, protocol.md §7.3) and
// "Unauthorized" for a SAS token (MicrosoftDocs/azure-docs#43157, over MQTT). The reason
// goes to the register request's history and the log.
func (s *Server) refuse(st *connState, reason string) reply {
	s.stats.refused.Add(1)
	code, msg := 401002, "Invalid certificate."
	if st.sas {
		code, msg = 401000, "Unauthorized"
	}
	s.log.Info("refused request", "registration", st.regID, "reason", reason)
	r := s.errorReply(401, code, msg, noRetryAfter)
	r.reason = reason
	return r
}

// registerRequest is DeviceRegistration (protocol.md §2.2); unknown fields are ignored.
type registerRequest struct {
	RegistrationID *string         `json:"registrationId"`
	Payload        json.RawMessage `json:"payload"`
	CSR            *string         `json:"csr"`
}

func (s *Server) register(st *connState, body []byte) reply {
	if ra, ok := s.admitRegister(strings.ToLower(st.regID)); !ok {
		return s.errorReply(429, 429001, "Registration quota of the service exceeded.", ra)
	}
	if st.enroll == nil {
		return s.refuse(st, st.refusal)
	}
	var req registerRequest
	if b := bytes.TrimSpace(body); len(b) > 0 {
		if err := json.Unmarshal(b, &req); err != nil {
			return s.errorReply(400, 400004, "Invalid request body: "+err.Error(), noRetryAfter)
		}
	}
	if req.RegistrationID != nil && !strings.EqualFold(*req.RegistrationID, st.regID) {
		return s.errorReply(400, 400005, fmt.Sprintf("registrationId %q in the body differs from %q in the username", *req.RegistrationID, st.regID), noRetryAfter)
	}
	maxLen := 128
	if st.enroll.leaf != nil {
		maxLen = 64
	}
	if len(st.regID) > maxLen || !registrationIDRE.MatchString(strings.ToLower(st.regID)) {
		return s.errorReply(400, 400006, fmt.Sprintf("registration ID %q is not valid: at most %d of a-z 0-9 - . _ :, ending in a letter, digit or -", st.regID, maxLen), noRetryAfter)
	}
	if leaf := st.enroll.leaf; leaf != nil && !strings.EqualFold(leaf.Subject.CommonName, st.regID) {
		return s.refuse(st, fmt.Sprintf("certificate CN %q does not match registration ID %q", leaf.Subject.CommonName, st.regID))
	}

	s.mu.Lock()
	policy, _ := s.lookupLocked(st.enroll, st.regID)
	disabled := policy != nil && policy.Disabled
	s.mu.Unlock()
	if policy == nil {
		return s.refuse(st, "enrollment "+st.enroll.id+" was removed")
	}
	if disabled {
		return reply{status: 200, body: disabledBody("", st.regID), retryAfter: noRetryAfter,
			outcome: OutcomeDisabled, reason: "enrollment " + st.enroll.id + " is disabled"}
	}

	op := &operation{id: s.opPrefix + uuid.New(), regID: st.regID, enroll: st.enroll, apiVersion: st.apiVersion,
		readyAt: s.cfg.Now().Add(s.cfg.AssignDelay)}
	if len(req.Payload) > 0 && string(req.Payload) != "null" {
		op.payload = req.Payload
	}
	if req.CSR != nil && st.apiVersion >= csrAPIVersion {
		credential := s.credentialOf(st.enroll, st.regID)
		csr, err := parseCSR(*req.CSR, st.regID)
		if err == nil {
			err = credential.check(csr)
		}
		if err != nil {
			// 400010 is the emulator's: the service's code for a refused CSR is unpublished.
			return s.errorReply(400, 400010, err.Error(), noRetryAfter)
		}
		if credential != nil { // without a policy DPS assigns and issues nothing
			op.csr = csr
		}
	}
	key := strings.ToLower(st.regID)
	s.mu.Lock()
	delete(s.ops, s.latestOp[key]) // a new registration supersedes the last one
	s.ops[op.id], s.latestOp[key] = op, op.id
	s.mu.Unlock()

	resp, _ := json.Marshal(operationStatus{OperationID: op.id, Status: "assigning"})
	return reply{status: 202, body: resp, retryAfter: s.cfg.RetryAfter, outcome: OutcomeAssigning, op: op}
}

// parseCSR decodes the csr field (base64 DER, protocol.md §4) and checks its signature and
// that its CN is the registration ID.
func parseCSR(field, regID string) (*x509.CertificateRequest, error) {
	der, err := base64.StdEncoding.DecodeString(field)
	if err != nil {
		return nil, fmt.Errorf("csr is not base64: %w", err)
	}
	csr, err := x509.ParseCertificateRequest(der)
	if err != nil {
		return nil, fmt.Errorf("csr is not a PKCS#10 request: %w", err)
	}
	if err := csr.CheckSignature(); err != nil {
		return nil, fmt.Errorf("csr signature is invalid: %w", err)
	}
	if csr.Subject.CommonName != regID {
		return nil, fmt.Errorf("csr CN %q does not match registration ID %q", csr.Subject.CommonName, regID)
	}
	return csr, nil
}

func (s *Server) poll(st *connState, opID string) reply {
	key := strings.ToLower(st.regID)
	s.mu.Lock()
	op := s.ops[opID]
	s.mu.Unlock()
	if op != nil && strings.EqualFold(op.regID, st.regID) {
		if err := s.notePoll(op); err != nil {
			return reply{err: err}
		}
	} else {
		op = nil
	}
	if ra, ok := s.admitPoll(key); !ok {
		return s.errorReply(429, 429002, fmt.Sprintf("More than %d operation status requests in %v.", s.cfg.PollLimit, PollWindow), ra)
	}
	if st.enroll == nil {
		return s.refuse(st, st.refusal)
	}
	if op == nil {
		return s.errorReply(404, 404201, fmt.Sprintf("Operation %q not found.", opID), noRetryAfter)
	}
	if s.cfg.Now().Before(op.readyAt) {
		body, _ := json.Marshal(operationStatus{OperationID: op.id, Status: "assigning",
			RegistrationState: &registrationState{RegistrationID: op.regID, Status: "assigning"}})
		return reply{status: 202, body: body, retryAfter: s.cfg.RetryAfter}
	}
	status, body, err := s.complete(op)
	return reply{status: status, body: body, retryAfter: noRetryAfter, err: err}
}

// admitRegister applies the instance's register quota, a sliding window of
// RegistrationsPerMinute. A device refused for it is told when a slot frees up for it, and
// that slot is kept for it until then: the next device refused is told a later slot. Telling
// every refused device the same first free slot would bring them back together to be refused
// again, all but one, on every round.
func (s *Server) admitRegister(key string) (time.Duration, bool) {
	n := s.cfg.RegistrationsPerMinute
	if n <= 0 {
		return 0, true
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	now := s.cfg.Now()
	cutoff := now.Add(-time.Minute)
	if slot, ok := s.reserved[key]; ok && slot.After(cutoff) {
		if now.Before(slot) {
			return slot.Sub(now), false // early: the same slot, still kept
		}
		delete(s.reserved, key)
		return 0, true // the slot is in the window already
	}
	i := 0
	for i < len(s.quota) && !s.quota[i].After(cutoff) {
		i++
	}
	if s.quota = s.quota[i:]; i > 0 {
		for k, slot := range s.reserved {
			if !slot.After(cutoff) {
				delete(s.reserved, k) // kept for a device that did not come back
			}
		}
	}
	// The window holds past registrations and kept slots, in order. A new one goes after
	// them all, at the first time the window has room: a minute after the n-th latest.
	slot := now
	if len(s.quota) > 0 && s.quota[len(s.quota)-1].After(slot) {
		slot = s.quota[len(s.quota)-1]
	}
	if len(s.quota) >= n {
		if free := s.quota[len(s.quota)-n].Add(time.Minute); free.After(slot) {
			slot = free
		}
	}
	s.quota = append(s.quota, slot)
	if slot.After(now) {
		s.reserved[key] = slot
		return slot.Sub(now), false
	}
	return 0, true
}

// admitPoll applies the per-device poll limit.
func (s *Server) admitPoll(key string) (time.Duration, bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	var wait time.Duration
	var ok bool
	s.polls[key], wait, ok = slide(s.polls[key], s.cfg.Now(), s.cfg.PollLimit, PollWindow)
	return wait, ok
}

// slide is a sliding-window limit of n events per window over the event times w: it drops
// expired events and records one at now, or, when the window is full, says how long until a
// slot frees. n <= 0 is no limit.
func slide(w []time.Time, now time.Time, n int, per time.Duration) ([]time.Time, time.Duration, bool) {
	if n <= 0 {
		return w, 0, true
	}
	i := 0
	for i < len(w) && !w[i].After(now.Add(-per)) {
		i++
	}
	w = w[i:]
	if len(w) >= n {
		return w, w[0].Add(per).Sub(now), false
	}
	return append(w, now), 0, true
}

// oversize pads a JSON object body with a field that pushes it past limit.
func oversize(body []byte, limit int) []byte {
	if limit <= 0 {
		limit = DefaultMaxMessageSize
	}
	if len(body) == 0 || body[len(body)-1] != '}' {
		return append(body, bytes.Repeat([]byte{' '}, limit+1)...)
	}
	pad := `,"padding":"` + strings.Repeat("x", limit) + `"}`
	return append(body[:len(body)-1:len(body)-1], pad...)
}

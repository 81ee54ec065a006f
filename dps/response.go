package dps

import (
	"bytes"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"net/url"
	"strconv"
	"strings"
	"time"
)

// Operation states of DPS (protocol.md §3.1). Anything else is a malformed reply.
const (
	statusUnassigned = "unassigned"
	statusAssigning  = "assigning"
	statusAssigned   = "assigned"
	statusFailed     = "failed"
	statusDisabled   = "disabled"
)

const (
	responsePrefix = "$dps/registrations/res/"
	// maxReply is DPS's message size limit (protocol.md §2.6); anything bigger is not DPS.
	maxReply = 96 * 1024
	// maxRetryAfter keeps a corrupt retry-after from parking the device for years.
	maxRetryAfter = 24 * time.Hour
)

// errMalformed marks a reply that breaks protocol.md §3; the emulator's faults produce them too.
var errMalformed = errors.New("malformed reply")

// reply is one response from DPS: the status and $rid from the topic, and the parsed body.
type reply struct {
	status        int
	rid           string
	retryAfter    time.Duration
	hasRetryAfter bool

	// For status 200 and 202.
	op *operation
	// For any other status.
	fail *errorBody
}

// operation is RegistrationOperationStatus with the fields of registrationState we use.
type operation struct {
	OperationID string
	Status      string
	State       *registrationState
}

type registrationState struct {
	RegistrationID string
	AssignedHub    string
	DeviceID       string
	Status         string
	Substatus      string
	ErrorCode      int
	ErrorMessage   string
	CreatedAt      time.Time
	UpdatedAt      time.Time
	Payload        json.RawMessage
	IssuedChain    [][]byte
	// ConnectionProfile is "" when DPS sent none or null.
	ConnectionProfile string
}

type errorBody struct {
	ErrorCode  int
	TrackingID string
	Message    string
	// Challenge is the decoded authenticationKey of TPM attestation's 401, nil otherwise.
	Challenge []byte
}

// parseTopic reads the status, $rid and retry-after of a response topic. The query is parsed
// in any order and unknown keys are ignored (§8.1); retry-after is matched case-insensitively
// because the C# SDK's tests spell it Retry-After.
func parseTopic(topic string) (status int, rid string, retryAfter time.Duration, hasRetryAfter bool, err error) {
	rest, ok := strings.CutPrefix(topic, responsePrefix)
	if !ok {
		return 0, "", 0, false, fmt.Errorf("%w: topic %q is not a DPS response", errMalformed, topic)
	}
	code, query, ok := strings.Cut(rest, "/?")
	if !ok {
		return 0, "", 0, false, fmt.Errorf("%w: topic %q has no query", errMalformed, topic)
	}
	status, err = strconv.Atoi(code)
	if err != nil || status < 100 || status > 599 || len(code) != 3 {
		return 0, "", 0, false, fmt.Errorf("%w: topic %q has no status code", errMalformed, topic)
	}
	values, err := url.ParseQuery(query)
	if err != nil {
		return 0, "", 0, false, fmt.Errorf("%w: topic %q: %v", errMalformed, topic, err)
	}
	rids, ok := values["$rid"]
	if !ok {
		return 0, "", 0, false, fmt.Errorf("%w: topic %q has no $rid", errMalformed, topic)
	}
	rid = rids[0]
	for k, v := range values {
		if strings.EqualFold(k, "retry-after") {
			retryAfter, hasRetryAfter = parseRetryAfter(v[0])
		}
	}
	return status, rid, retryAfter, hasRetryAfter, nil
}

// parseRetryAfter reads a retry-after value, a whole number of seconds (over MQTT in the
// topic, over HTTPS in the Retry-After header). Anything else is ignored, as if absent.
func parseRetryAfter(v string) (time.Duration, bool) {
	secs, err := strconv.ParseUint(v, 10, 32)
	if err != nil {
		return 0, false
	}
	return min(time.Duration(secs)*time.Second, maxRetryAfter), true
}

// parseReply parses one response strictly (protocol.md §3, §7.3): unknown fields are
// ignored, but the shapes ESDK-C rejects are rejected here too.
func parseReply(topic string, body []byte) (*reply, error) {
	status, rid, retryAfter, hasRetryAfter, err := parseTopic(topic)
	if err != nil {
		return nil, err
	}
	r := &reply{status: status, rid: rid, retryAfter: retryAfter, hasRetryAfter: hasRetryAfter}
	return r, r.parseBody(body)
}

// parseBody parses the body of a reply whose status is known, whichever transport carried it.
func (r *reply) parseBody(body []byte) (err error) {
	if len(body) > maxReply {
		return fmt.Errorf("%w: %d bytes, more than DPS's limit of %d", errMalformed, len(body), maxReply)
	}
	if r.status == 200 || r.status == 202 {
		r.op, err = parseOperation(body)
	} else {
		r.fail, err = parseErrorBody(body)
	}
	return err
}

// usable is what a reply whose body failed to parse is still good for: nothing when it is an
// operation; when it is an error, its status, which carries the meaning (protocol.md §8.1).
func usable(rep *reply, err error) (*reply, error) {
	if err != nil && (rep.status == 200 || rep.status == 202) {
		return nil, malformed(err)
	}
	return rep, nil
}

func parseOperation(body []byte) (*operation, error) {
	var raw struct {
		OperationID       *string          `json:"operationId"`
		Status            *string          `json:"status"`
		RegistrationState *json.RawMessage `json:"registrationState"`
	}
	if err := decodeObject(body, &raw); err != nil {
		return nil, err
	}
	if raw.OperationID == nil {
		return nil, fmt.Errorf("%w: no operationId", errMalformed)
	}
	if raw.Status == nil {
		return nil, fmt.Errorf("%w: no status", errMalformed)
	}
	if err := checkStatus(*raw.Status); err != nil {
		return nil, err
	}
	op := &operation{OperationID: *raw.OperationID, Status: *raw.Status}
	if raw.RegistrationState != nil && !isNull(*raw.RegistrationState) {
		st, err := parseState(*raw.RegistrationState)
		if err != nil {
			return nil, err
		}
		op.State = st
	}
	if op.Status == statusAssigned && (op.State == nil || op.State.AssignedHub == "") {
		return nil, fmt.Errorf("%w: assigned without an assignedHub", errMalformed)
	}
	return op, nil
}

func parseState(data []byte) (*registrationState, error) {
	var raw struct {
		RegistrationID string          `json:"registrationId"`
		AssignedHub    *string         `json:"assignedHub"`
		DeviceID       *string         `json:"deviceId"`
		Status         string          `json:"status"`
		Substatus      string          `json:"substatus"`
		ErrorCode      int             `json:"errorCode"`
		ErrorMessage   string          `json:"errorMessage"`
		Created        string          `json:"createdDateTimeUtc"`
		Updated        string          `json:"lastUpdatedDateTimeUtc"`
		Payload        json.RawMessage `json:"payload"`
		IssuedChain    []string        `json:"issuedCertificateChain"`
		Profile        *string         `json:"connectionProfile"`
	}
	if err := decodeObject(data, &raw); err != nil {
		return nil, fmt.Errorf("registrationState: %w", err)
	}
	if (raw.AssignedHub == nil) != (raw.DeviceID == nil) {
		return nil, fmt.Errorf("%w: registrationState has only one of assignedHub and deviceId", errMalformed)
	}
	if raw.Status != "" {
		if err := checkStatus(raw.Status); err != nil {
			return nil, fmt.Errorf("registrationState: %w", err)
		}
	}
	st := &registrationState{
		RegistrationID: raw.RegistrationID,
		Status:         raw.Status,
		Substatus:      raw.Substatus,
		ErrorCode:      raw.ErrorCode,
		ErrorMessage:   raw.ErrorMessage,
		CreatedAt:      parseTime(raw.Created),
		UpdatedAt:      parseTime(raw.Updated),
	}
	if raw.AssignedHub != nil {
		st.AssignedHub, st.DeviceID = *raw.AssignedHub, *raw.DeviceID
	}
	if raw.Profile != nil {
		st.ConnectionProfile = *raw.Profile
	}
	if len(raw.Payload) > 0 && !isNull(raw.Payload) {
		st.Payload = bytes.Clone(raw.Payload)
	}
	for i, s := range raw.IssuedChain {
		der, err := base64.StdEncoding.DecodeString(s)
		if err != nil || len(der) == 0 {
			return nil, fmt.Errorf("%w: issuedCertificateChain[%d] is not base64 DER", errMalformed, i)
		}
		st.IssuedChain = append(st.IssuedChain, der)
	}
	return st, nil
}

func parseErrorBody(body []byte) (*errorBody, error) {
	var raw struct {
		ErrorCode         *int    `json:"errorCode"`
		TrackingID        string  `json:"trackingId"`
		Message           string  `json:"message"`
		AuthenticationKey *string `json:"authenticationKey"`
	}
	if err := decodeObject(body, &raw); err != nil {
		return nil, err
	}
	e := &errorBody{TrackingID: raw.TrackingID, Message: raw.Message}
	if raw.AuthenticationKey != nil {
		// TPM attestation's challenge (certificates.md §4), a 401 with no errorCode.
		key, err := base64.StdEncoding.DecodeString(*raw.AuthenticationKey)
		if err != nil || len(key) == 0 {
			return nil, fmt.Errorf("%w: authenticationKey is not base64", errMalformed)
		}
		e.Challenge = key
	}
	switch {
	case raw.ErrorCode != nil:
		e.ErrorCode = *raw.ErrorCode
	case e.Challenge == nil:
		return nil, fmt.Errorf("%w: error reply without errorCode", errMalformed)
	}
	return e, nil
}

// decodeObject decodes one JSON object and nothing after it.
func decodeObject(data []byte, v any) error {
	data = bytes.TrimSpace(data)
	if len(data) == 0 || data[0] != '{' {
		return fmt.Errorf("%w: body is not a JSON object", errMalformed)
	}
	dec := json.NewDecoder(bytes.NewReader(data))
	if err := dec.Decode(v); err != nil {
		return fmt.Errorf("%w: %v", errMalformed, err)
	}
	if dec.InputOffset() != int64(len(data)) {
		return fmt.Errorf("%w: data after the JSON object", errMalformed)
	}
	return nil
}

func checkStatus(s string) error {
	switch s {
	case statusUnassigned, statusAssigning, statusAssigned, statusFailed, statusDisabled:
		return nil
	}
	return fmt.Errorf("%w: unknown status %q", errMalformed, s)
}

func isNull(data json.RawMessage) bool { return string(bytes.TrimSpace(data)) == "null" }

// parseTime reads DPS's timestamps (RFC 3339, 7 fractional digits). They are informative
// only, so one that does not parse is left zero rather than failing the registration.
func parseTime(s string) time.Time {
	t, err := time.Parse(time.RFC3339Nano, s)
	if err != nil {
		return time.Time{}
	}
	return t
}

package dps

import (
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/unicity-iot/unicity/internal/dial"
)

var (
	// ErrRefused marks a permanent refusal: no or a disabled enrollment, a rejected
	// certificate or key, a CN that is not the registration ID, an allocation that failed.
	// Retrying the same request will not help; a person has to change something.
	ErrRefused = errors.New("refused by DPS")
	// ErrUnreachable marks a failure to reach DPS at all: DNS, TCP, proxy, TLS, or a
	// connection that dropped. It is dial.ErrUnreachable, so either name matches.
	ErrUnreachable = dial.ErrUnreachable

	// ErrNotIssued marks a registration that sent a CSR and got an assignment without a
	// certificate: the enrollment has no credential policy (certificates.md §1). It is
	// permanent, as ErrRefused is, until an operator links a policy.
	ErrNotIssued = errors.New("DPS issued no certificate")
	// ErrMQTT5 marks an assignment to a hub reached over MQTT 5 (connectionProfile mqttV5),
	// which this agent does not speak yet. Permanent.
	ErrMQTT5 = errors.New("MQTT 5 hubs are not supported yet")
	// ErrConnectionProfile marks an assignment whose connectionProfile this agent does not
	// know. Permanent, as for Microsoft's C client.
	ErrConnectionProfile = errors.New("unknown connection profile")
)

// Error is what DPS (or the way to it) said when a registration did not succeed.
type Error struct {
	// Status is the status of the reply's topic: 4xx/5xx, or 200 for a failed or disabled
	// operation. Zero when DPS did not answer (connection refused, dropped, timed out).
	Status int
	// ErrorCode is DPS's six-digit code (401002, 400207, …), zero when it gave none.
	ErrorCode int
	// TrackingID identifies the request for Azure support.
	TrackingID string
	// Message names the likely cause in plain words, for a technician.
	Message string
	// RetryAfter is how long DPS asked us to wait, zero if it did not say.
	RetryAfter time.Duration

	temporary bool
	err       error
}

func (e *Error) Error() string {
	var b strings.Builder
	b.WriteString(e.Message)
	switch {
	case e.ErrorCode != 0:
		fmt.Fprintf(&b, " (DPS status %d, error %d", e.Status, e.ErrorCode)
	case e.Status != 0:
		fmt.Fprintf(&b, " (DPS status %d", e.Status)
	}
	if e.Status != 0 || e.ErrorCode != 0 {
		if e.TrackingID != "" {
			fmt.Fprintf(&b, ", tracking ID %s", e.TrackingID)
		}
		b.WriteString(")")
	}
	if e.err != nil {
		fmt.Fprintf(&b, ": %v", e.err)
	}
	return b.String()
}

// Temporary reports whether trying again later may succeed: throttling, server errors,
// network failures and timeouts.
func (e *Error) Temporary() bool { return e.temporary }

// Is makes errors.Is(err, ErrRefused) true for permanent refusals.
func (e *Error) Is(target error) bool { return target == ErrRefused && !e.temporary }

func (e *Error) Unwrap() error { return e.err }

func refused(msg string, a ...any) *Error {
	return &Error{Message: fmt.Sprintf(msg, a...)}
}

// unreachable wraps a network failure so that errors.Is(err, ErrUnreachable) holds.
func unreachable(msg string, err error) *Error {
	if !errors.Is(err, ErrUnreachable) {
		err = fmt.Errorf("%w: %w", ErrUnreachable, err)
	}
	return &Error{Message: msg, temporary: true, err: err}
}

// replyError turns a DPS error reply into an Error with a message for a technician.
func (r *registration) replyError(rep *reply) *Error {
	e := &Error{Status: rep.status, RetryAfter: rep.retryAfter}
	if rep.fail != nil {
		e.ErrorCode, e.TrackingID = rep.fail.ErrorCode, rep.fail.TrackingID
	}
	said := ""
	if rep.fail != nil && rep.fail.Message != "" {
		said = ": DPS says " + quote(rep.fail.Message)
	}
	switch {
	case rep.status == 429:
		e.temporary = true
		e.Message = "throttled by DPS" + said
	case rep.status >= 500:
		e.temporary = true
		e.Message = "DPS had an internal error" + said
	case rep.status == 401 || rep.status == 403:
		e.Message = r.authFailure() + said
	case rep.status == 404:
		e.Message = fmt.Sprintf("no enrollment matches registration ID %s in ID scope %s", quote(r.regID), r.req.IDScope) + said
	case rep.status == 412:
		e.Message = "DPS rejected the request as out of date (precondition failed)" + said
	default:
		e.Message = fmt.Sprintf("DPS rejected the registration request (%d)", rep.status) + said
	}
	return e
}

// authFailure explains a 401, 403 or CONNACK 4/5: DPS did not accept who we are.
func (r *registration) authFailure() string {
	switch {
	case r.req.TPM != nil && r.signer == nil:
		return fmt.Sprintf("no individual enrollment matches this TPM's endorsement key (registration ID %s)", quote(r.regID))
	case r.req.TPM != nil:
		return fmt.Sprintf("DPS did not accept the SAS token signed with the TPM's identity key for registration ID %s", quote(r.regID))
	}
	if r.symmetricKey != nil {
		return fmt.Sprintf("DPS did not accept the symmetric key for registration ID %s: the key is wrong or no enrollment matches", quote(r.regID))
	}
	return fmt.Sprintf("no enrollment matches this certificate (registration ID %s), or its chain up to the enrolled CA is incomplete", quote(r.regID))
}

// operationError explains an operation that ended failed or disabled (a 200 reply).
func (r *registration) operationError(rep *reply) *Error {
	e := &Error{Status: rep.status}
	st := rep.op.State
	if st == nil {
		st = &registrationState{}
	}
	e.ErrorCode = st.ErrorCode
	if rep.op.Status == statusDisabled {
		e.Message = fmt.Sprintf("enrollment disabled for registration ID %s", quote(r.regID))
		return e
	}
	switch st.ErrorCode {
	case 400208:
		e.Message = "DPS could not assign a hub: no IoT hub is linked to the enrollment"
	case 400209:
		e.Message = "DPS could not assign a hub: DPS is not authorized on the linked IoT hub"
	default:
		e.Message = "DPS could not assign a hub"
	}
	if st.ErrorMessage != "" {
		e.Message += ": DPS says " + quote(st.ErrorMessage)
	}
	return e
}

// malformed is a reply we cannot use. Registering again is always safe, so it is temporary.
func malformed(err error) *Error {
	return &Error{Message: "DPS sent a reply this agent cannot use", temporary: true, err: err}
}

func quote(s string) string { return "'" + s + "'" }

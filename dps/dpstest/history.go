package dpstest

import (
	"sort"
	"strings"
	"time"
)

// Outcomes of a register request (Attempt.Outcome).
const (
	OutcomeAssigning = "assigning" // accepted; no poll has completed the operation (yet)
	OutcomeAssigned  = "assigned"
	OutcomeFailed    = "failed"    // the operation failed: allocation, hub registration
	OutcomeDisabled  = "disabled"  // the enrollment is disabled
	OutcomeThrottled = "throttled" // 429: over the registration quota
	OutcomeRefused   = "refused"   // 401: no enrollment admits the device, or a bad credential
	OutcomeRejected  = "rejected"  // 400: a malformed or invalid request
	OutcomeError     = "error"     // any other answer (scripted faults)
)

// MaxAttempts bounds the register requests a server remembers; the oldest are forgotten.
const MaxAttempts = 10000

// Attempt is one register request as the service saw it, throttled and refused ones
// included, and what became of it: what a test bench counts to tell that a device did, or did
// not, register.
type Attempt struct {
	// Seq numbers the requests in the order they arrived, from 1.
	Seq            uint64 `json:"seq"`
	RegistrationID string `json:"registration_id"`
	// OperationID is set when the request started an operation (Outcome assigning and what
	// it ended as).
	OperationID string    `json:"operation_id,omitempty"`
	Requested   time.Time `json:"requested"`
	Completed   time.Time `json:"completed,omitzero"`
	Outcome     string    `json:"outcome"`
	// Status and ErrorCode are those of the last answer about it: 202 while assigning, 200
	// once the operation ended (ErrorCode when it failed), or the refusal.
	Status    int `json:"status"`
	ErrorCode int `json:"error_code,omitempty"`
	// Reason says why it was refused or failed, in more words than the service gives the
	// device.
	Reason string `json:"reason,omitempty"`
	// Polls counts the operation status requests for its operation, throttled ones included.
	Polls     int    `json:"polls"`
	Hub       string `json:"hub,omitempty"`
	DeviceID  string `json:"device_id,omitempty"`
	Substatus string `json:"substatus,omitempty"`
}

// Journal is told of every change to what a restarted service must still know: each
// device's latest registration, and the register requests. The server calls it with its lock
// held, in the order of the changes. When it fails, the request that made the change is not
// answered (its connection is closed, so the device asks again) and an operator call returns
// the error.
type Journal interface {
	SaveRegistration(Registration) error
	DeleteRegistration(regID string) error
	SaveAttempt(Attempt) error
}

// Restore puts back what a Journal was told, before Start: registrations, and attempts in
// the order they were made. It replaces what the server has.
func (s *Server) Restore(regs []Registration, attempts []Attempt) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.records = make(map[string]*record, len(regs))
	for _, r := range regs {
		s.records[strings.ToLower(r.RegistrationID)] = &record{Registration: r, etag: newETag()}
	}
	if len(attempts) > MaxAttempts {
		attempts = attempts[len(attempts)-MaxAttempts:]
	}
	s.attempts = make([]*Attempt, 0, len(attempts))
	s.seq = 0
	for _, a := range attempts {
		s.attempts = append(s.attempts, &a)
		s.seq = max(s.seq, a.Seq)
	}
	sort.Slice(s.attempts, func(i, j int) bool { return s.attempts[i].Seq < s.attempts[j].Seq })
}

// Attempts returns the register requests of a registration ID (any case; "" for every
// device), oldest first.
func (s *Server) Attempts(regID string) []Attempt {
	s.mu.Lock()
	defer s.mu.Unlock()
	var out []Attempt
	for _, a := range s.attempts {
		if regID == "" || strings.EqualFold(a.RegistrationID, regID) {
			out = append(out, *a)
		}
	}
	return out
}

// noteRegisterLocked records a register request and the answer it got.
func (s *Server) noteRegisterLocked(regID string, r reply) error {
	s.seq++
	a := &Attempt{Seq: s.seq, RegistrationID: regID, Requested: s.cfg.Now().UTC(), Outcome: r.outcome,
		Status: r.status, ErrorCode: r.code, Reason: r.reason}
	if r.op != nil {
		a.OperationID, r.op.attempt = r.op.id, a.Seq
	}
	if len(s.attempts) == MaxAttempts {
		s.attempts = append(s.attempts[:0], s.attempts[1:]...)
	}
	s.attempts = append(s.attempts, a)
	return s.journalAttemptLocked(a)
}

// attemptLocked finds the attempt that started op, nil when it has been forgotten.
func (s *Server) attemptLocked(op *operation) *Attempt {
	i := sort.Search(len(s.attempts), func(i int) bool { return s.attempts[i].Seq >= op.attempt })
	if i == len(s.attempts) || s.attempts[i].Seq != op.attempt {
		return nil
	}
	return s.attempts[i]
}

// notePoll counts a poll of op.
func (s *Server) notePoll(op *operation) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	a := s.attemptLocked(op)
	if a == nil {
		return nil
	}
	a.Polls++
	return s.journalAttemptLocked(a)
}

// noteCompleted records how op ended.
func (s *Server) noteCompleted(op *operation, st *registrationState) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	a := s.attemptLocked(op)
	if a == nil {
		return nil
	}
	a.Completed, a.Status, a.Outcome = s.cfg.Now().UTC(), 200, st.Status
	a.ErrorCode, a.Reason = st.ErrorCode, st.ErrorMessage
	a.Hub, a.DeviceID, a.Substatus = st.AssignedHub, st.DeviceID, st.Substatus
	return s.journalAttemptLocked(a)
}

func (s *Server) journalAttemptLocked(a *Attempt) error {
	if s.cfg.Journal == nil {
		return nil
	}
	return s.cfg.Journal.SaveAttempt(*a)
}

package dpstest

import (
	"strings"
	"time"
)

// Step is the device request a Fault applies to.
type Step int

const (
	StepConnect Step = iota + 1
	StepSubscribe
	StepRegister
	StepPoll
	// StepWebSocket is the HTTP request that upgrades a connection to MQTT over WebSocket,
	// before any MQTT: as a middlebox that does not pass WebSocket would, Drop closes the
	// connection and Status answers the request with that HTTP status.
	StepWebSocket
)

// Action is what a Fault does instead of, or to, the normal answer.
type Action int

const (
	// Drop closes the connection instead of answering.
	Drop Action = iota + 1
	// DropAfterReply answers normally, then closes the connection.
	DropAfterReply
	// Delay answers normally after Fault.Delay.
	Delay
	// Status answers with Fault.Status and an error body, without processing the request;
	// at StepConnect it is the CONNACK return code, at StepSubscribe any value refuses
	// the subscription (0x80).
	Status
	// Malformed answers with a truncated JSON body.
	Malformed
	// Oversized answers with a valid body larger than the message limit.
	Oversized
	// WrongRID answers with a $rid the device did not send.
	WrongRID
)

// Fault is a scripted misbehaviour for client robustness tests. Register and poll take
// every action; connect takes Drop, Delay and Status; subscribe takes Drop and Status. Over
// HTTPS, where each request authenticates by itself, there is no connect nor subscribe;
// register and poll take every action but WrongRID (no $rid), Drop closes the connection
// without a response and DropAfterReply closes it after one.
type Fault struct {
	Step   Step
	Action Action
	// RegistrationID limits the fault to one device (any case); empty matches all.
	RegistrationID string
	// Skip lets that many matching requests through before the fault fires; Times is how
	// often it fires then (0: every time).
	Skip, Times int
	Delay       time.Duration
	Status      int
	// RetryAfter is announced with a Status answer when positive.
	RetryAfter time.Duration
}

type armedFault struct {
	Fault
	seen, fired int
}

// AddFault arms a fault.
func (s *Server) AddFault(f Fault) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.faults = append(s.faults, &armedFault{Fault: f})
}

// ClearFaults disarms every fault.
func (s *Server) ClearFaults() {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.faults = nil
}

// fault returns the first armed fault that fires for this request, or nil.
func (s *Server) fault(step Step, regID string) *Fault {
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, f := range s.faults {
		if f.Step != step || (f.RegistrationID != "" && !strings.EqualFold(f.RegistrationID, regID)) {
			continue
		}
		f.seen++
		if f.seen <= f.Skip || (f.Times > 0 && f.fired >= f.Times) {
			continue
		}
		f.fired++
		out := f.Fault
		return &out
	}
	return nil
}

package dpstest

import (
	"errors"
	"io"
	"net/http"
	"strings"
)

// httpHandler serves what arrives over HTTP on both ports: WebSocket upgrades to MQTT, and
// the device API's REST form (certificates.md §4):
//
//	PUT /{idScope}/registrations/{registrationId}/register?api-version=…
//	GET /{idScope}/registrations/{registrationId}/operations/{operationId}?api-version=…
//
// Each request authenticates by itself, with the TLS client certificate or a SAS token in
// Authorization, and is answered by the MQTT API's registration logic, limits and faults:
// the reply's status in the status line, retry-after in its header.
func (s *Server) httpHandler() http.Handler {
	rest := http.NewServeMux()
	rest.HandleFunc("PUT /{scope}/registrations/{regID}/register", func(w http.ResponseWriter, r *http.Request) {
		s.serveREST(w, r, StepRegister)
	})
	rest.HandleFunc("GET /{scope}/registrations/{regID}/operations/{opID}", func(w http.ResponseWriter, r *http.Request) {
		s.serveREST(w, r, StepPoll)
	})
	ws := s.mqtt.WebSocket()
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if !strings.EqualFold(r.Header.Get("Upgrade"), "websocket") {
			rest.ServeHTTP(w, r)
			return
		}
		if f := s.fault(StepWebSocket, ""); f != nil {
			switch f.Action {
			case Drop:
				panic(http.ErrAbortHandler) // net/http closes the connection
			case Status:
				http.Error(w, "scripted fault", f.Status)
				return
			}
		}
		ws.ServeHTTP(w, r)
	})
}

func (s *Server) serveREST(w http.ResponseWriter, r *http.Request, step Step) {
	if step == StepRegister {
		s.stats.registrations.Add(1)
	} else {
		s.stats.polls.Add(1)
	}
	regID := r.PathValue("regID")
	body, err := io.ReadAll(s.limitBody(w, r.Body))
	var tooLarge *http.MaxBytesError
	if errors.As(err, &tooLarge) {
		// As over MQTT, where the connection of an oversized message is closed.
		s.log.Info("request over the message limit", "registration", regID, "limit", tooLarge.Limit)
		panic(http.ErrAbortHandler)
	}
	if err != nil {
		return // the device went away
	}
	apiVersion := r.URL.Query().Get("api-version")
	if !apiVersionRE.MatchString(apiVersion) {
		s.writeReply(w, s.errorReply(400, 400001, "The api-version query parameter is missing or not valid.", noRetryAfter))
		return
	}
	if !s.knownScope(r.PathValue("scope"), regID) {
		// As over MQTT, where the CONNECT is answered "server unavailable".
		s.writeReply(w, s.errorReply(http.StatusServiceUnavailable, 503000, "Service unavailable.", noRetryAfter))
		return
	}
	var password []byte
	if a := r.Header.Get("Authorization"); a != "" {
		password = []byte(a)
	}
	if password == nil && step == StepRegister {
		if reply, ok := s.challengeTPM(regID, body); ok {
			s.writeReply(w, reply)
			return
		}
	}
	st := s.admit(regID, apiVersion, password, r.TLS)
	if st.enroll == nil {
		s.log.Info("unknown device", "registration", regID, "reason", st.refusal)
	}

	f := s.fault(step, regID)
	if f != nil && f.Action == Drop {
		panic(http.ErrAbortHandler)
	}
	reply, err := s.answer(st, step, f, body, r.PathValue("opID"))
	if err != nil {
		s.log.Info("closing the connection", "registration", regID, "err", err)
		panic(http.ErrAbortHandler)
	}
	if f != nil && f.Action == Delay && !s.sleep(r.Context().Done(), f.Delay) {
		return
	}
	if f != nil && f.Action == DropAfterReply {
		w.Header().Set("Connection", "close")
	}
	s.writeReply(w, reply)
}

// limitBody bounds a request body at the message limit, if there is one.
func (s *Server) limitBody(w http.ResponseWriter, body io.ReadCloser) io.Reader {
	if s.cfg.MaxMessageSize <= 0 {
		return body
	}
	return http.MaxBytesReader(w, body, int64(s.cfg.MaxMessageSize))
}

// writeReply sends a reply as the REST API does: JSON, and retry-after as over MQTT.
func (s *Server) writeReply(w http.ResponseWriter, r reply) {
	w.Header().Set("Content-Type", "application/json; charset=utf-8")
	if r.retryAfter >= 0 {
		w.Header().Set("Retry-After", retryAfterSeconds(r.retryAfter))
	}
	w.WriteHeader(r.status)
	w.Write(r.body)
}

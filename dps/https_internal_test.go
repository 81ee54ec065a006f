package dps

import (
	"encoding/base64"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// challengeBody is TPM attestation's 401 as the Node SDK reads it (certificates.md §4).
var challengeBody = `{"authenticationKey":"` + base64.StdEncoding.EncodeToString([]byte("credential blob")) + `"}`

// TestParseHTTPReply: a REST reply means what the same MQTT reply means, with its status
// from the status line and retry-after from the header.
func TestParseHTTPReply(t *testing.T) {
	t.Run("assigning with retry-after", func(t *testing.T) {
		r, err := parseHTTPReply(202, "3", []byte(bodyAssigning))
		require.NoError(t, err)
		assert.Equal(t, 202, r.status)
		assert.True(t, r.hasRetryAfter)
		assert.Equal(t, 3*time.Second, r.retryAfter)
		assert.Equal(t, opID, r.op.OperationID)
	})
	t.Run("assigned, no retry-after", func(t *testing.T) {
		r, err := parseHTTPReply(200, "", []byte(bodyAssigned))
		require.NoError(t, err)
		assert.False(t, r.hasRetryAfter)
		assert.Equal(t, "contoso.azure-devices.net", r.op.State.AssignedHub)
	})
	t.Run("throttled", func(t *testing.T) {
		r, err := parseHTTPReply(429, "40", []byte(`{"errorCode":429001,"trackingId":"t-1","message":"Too many requests"}`))
		require.NoError(t, err)
		assert.Equal(t, 40*time.Second, r.retryAfter)
		assert.Equal(t, 429001, r.fail.ErrorCode)
		assert.Nil(t, r.fail.Challenge)
	})
	t.Run("retry-after that is no whole number of seconds is ignored", func(t *testing.T) {
		for _, v := range []string{"Wed, 21 Oct 2026 07:28:00 GMT", "-1", "1.5", "soon"} {
			r, err := parseHTTPReply(202, v, []byte(bodyAssigning))
			require.NoError(t, err)
			assert.False(t, r.hasRetryAfter, v)
		}
		r, err := parseHTTPReply(202, "999999999", []byte(bodyAssigning))
		require.NoError(t, err)
		assert.Equal(t, maxRetryAfter, r.retryAfter, "capped")
	})
	t.Run("TPM challenge", func(t *testing.T) {
		r, err := parseHTTPReply(401, "", []byte(challengeBody))
		require.NoError(t, err)
		assert.Equal(t, []byte("credential blob"), r.fail.Challenge)
		assert.Zero(t, r.fail.ErrorCode)
	})
	t.Run("rejected", func(t *testing.T) {
		for name, tt := range map[string]struct {
			status int
			body   string
			want   string
		}{
			"challenge not base64":         {401, `{"authenticationKey":"not base64!"}`, "authenticationKey is not base64"},
			"empty challenge":              {401, `{"authenticationKey":""}`, "authenticationKey is not base64"},
			"HTML from a gateway":          {502, `<html><body>Bad Gateway</body></html>`, "not a JSON object"},
			"assigned without a hub":       {200, `{"operationId":"x","status":"assigned"}`, "assigned without an assignedHub"},
			"empty 200":                    {200, ``, "not a JSON object"},
			"error without errorCode":      {500, `{"message":"oops"}`, "error reply without errorCode"},
			"bigger than DPS's size limit": {200, `{"operationId":"x","status":"assigning","pad":"` + string(make([]byte, maxReply)) + `"}`, "more than DPS's limit"},
		} {
			t.Run(name, func(t *testing.T) {
				r, err := parseHTTPReply(tt.status, "", []byte(tt.body))
				require.ErrorIs(t, err, errMalformed)
				assert.Contains(t, err.Error(), tt.want)
				assert.Equal(t, tt.status, r.status, "the status still says what happened")
			})
		}
	})
}

// TestUsableHTTPReply: an operation whose body is broken is a malformed reply (temporary);
// an error whose body is broken still counts by its status.
func TestUsableHTTPReply(t *testing.T) {
	_, err := usable(parseHTTPReply(202, "", []byte(`{"operationId":`)))
	var e *Error
	require.ErrorAs(t, err, &e)
	assert.True(t, e.Temporary())

	rep, err := usable(parseHTTPReply(503, "", []byte(`<html>Service Unavailable</html>`)))
	require.NoError(t, err)
	assert.Equal(t, 503, rep.status)
	assert.True(t, (&registration{}).replyError(rep).Temporary())
}

// FuzzParseHTTPReply checks that no REST reply crashes the parser and that what it accepts
// is usable, as FuzzParseResponse does for MQTT.
func FuzzParseHTTPReply(f *testing.F) {
	f.Add(202, "3", []byte(bodyAssigning))
	f.Add(200, "", []byte(bodyAssigned))
	f.Add(401, "", []byte(challengeBody))
	f.Add(401, "", []byte(`{"errorCode":401002,"trackingId":"8ad0463c","message":"Invalid certificate."}`))
	f.Add(429, "40", []byte(`{"errorCode":429001}`))
	f.Fuzz(func(t *testing.T, status int, retryAfter string, body []byte) {
		r, err := parseHTTPReply(status, retryAfter, body)
		if r == nil || r.status != status {
			t.Fatalf("reply %+v for status %d", r, status)
		}
		if err == nil {
			checkAccepted(t, r)
		}
	})
}

// checkAccepted fails the fuzzers on a reply the parser accepted but the registration
// cannot use: an assignment always names a hub, a failure always carries an error code or a
// challenge, and retry-after is in range.
func checkAccepted(t *testing.T, r *reply) {
	switch {
	case r.op != nil:
		if r.op.Status == statusAssigned && (r.op.State == nil || r.op.State.AssignedHub == "") {
			t.Fatalf("assigned without hub: %+v", r.op)
		}
	case r.fail == nil:
		t.Fatalf("accepted reply has neither operation nor error: %+v", r)
	case r.fail.Challenge != nil && len(r.fail.Challenge) == 0:
		t.Fatalf("empty challenge accepted")
	}
	if r.retryAfter < 0 || r.retryAfter > maxRetryAfter {
		t.Fatalf("retry-after %v out of range", r.retryAfter)
	}
}

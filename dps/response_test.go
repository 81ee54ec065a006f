package dps

import (
	"encoding/base64"
	"encoding/json"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// Vectors from protocol.md §7.2 and §7.3 (ESDK-C parser tests), quoted exactly.
const (
	opID          = "4.d0a671905ea5b2c8.42d78160-4c78-479e-8be7-61d5e55dac0d"
	bodyAssigned  = `{"operationId":"4.d0a671905ea5b2c8.42d78160-4c78-479e-8be7-61d5e55dac0d","status":"assigned","registrationState":{"x509":{},"registrationId":"myRegistrationId","createdDateTimeUtc":"2020-04-10T03:11:13.0276997Z","assignedHub":"contoso.azure-devices.net","deviceId":"my-device-id1","status":"assigned","substatus":"initialAssignment","lastUpdatedDateTimeUtc":"2020-04-10T03:11:13.2096201Z","etag":"IjYxMDA4ZDQ2LTAwMDAtMDEwMC0wMDAwLTVlOGZlM2QxMDAwMCI="}}`
	bodyAssigning = `{"operationId":"4.d0a671905ea5b2c8.42d78160-4c78-479e-8be7-61d5e55dac0d","status":"assigning"}`
)

func withProfile(op *operation, profile string) *operation {
	op.State.ConnectionProfile = profile
	return op
}

// withState inserts extra registrationState fields before the closing "}}" of bodyAssigned.
func withState(extra string) string { return strings.TrimSuffix(bodyAssigned, "}}") + extra + "}}" }

func TestParseReplyHappyPath(t *testing.T) {
	created := time.Date(2020, 4, 10, 3, 11, 13, 27699700, time.UTC)
	updated := time.Date(2020, 4, 10, 3, 11, 13, 209620100, time.UTC)
	assigned := func(payload string, chain ...string) *operation {
		st := &registrationState{
			RegistrationID: "myRegistrationId", AssignedHub: "contoso.azure-devices.net", DeviceID: "my-device-id1",
			Status: "assigned", Substatus: "initialAssignment", CreatedAt: created, UpdatedAt: updated,
		}
		if payload != "" {
			st.Payload = json.RawMessage(payload)
		}
		for _, c := range chain {
			st.IssuedChain = append(st.IssuedChain, []byte(c))
		}
		return &operation{OperationID: opID, Status: "assigned", State: st}
	}
	b64 := base64.StdEncoding.EncodeToString
	tests := []struct {
		name, topic, body string
		want              reply
	}{
		{"registered, assigning", "$dps/registrations/res/202/?$rid=1&retry-after=3", bodyAssigning,
			reply{status: 202, rid: "1", retryAfter: 3 * time.Second, hasRetryAfter: true, op: &operation{OperationID: opID, Status: "assigning"}}},
		{"polled, retry-after first", "$dps/registrations/res/202/?retry-after=120&$rid=1",
			`{"operationId":"4.d0a671905ea5b2c8.42d78160-4c78-479e-8be7-61d5e55dac0d","status":"assigning","registrationState":{"registrationId":"myRegistrationId","status":"assigning"}}`,
			reply{status: 202, rid: "1", retryAfter: 120 * time.Second, hasRetryAfter: true, op: &operation{OperationID: opID, Status: "assigning",
				State: &registrationState{RegistrationID: "myRegistrationId", Status: "assigning"}}}},
		{"assigned", "$dps/registrations/res/200/?$rid=1", bodyAssigned,
			reply{status: 200, rid: "1", op: assigned("")}},
		{"assigned with payload", "$dps/registrations/res/200/?$rid=1",
			withState(`,"payload":{"hello":"world","o1":{"v1":123, "o2": {"v2":321}}, "arr":[1,2,3,4,5,6],"num":123}`),
			reply{status: 200, rid: "1", op: assigned(`{"hello":"world","o1":{"v1":123, "o2": {"v2":321}}, "arr":[1,2,3,4,5,6],"num":123}`)}},
		{"assigned with empty payload", "$dps/registrations/res/200/?$rid=1", withState(`,"payload":{}`),
			reply{status: 200, rid: "1", op: assigned(`{}`)}},
		{"assigned with null payload", "$dps/registrations/res/200/?$rid=1", withState(`,"payload": null`),
			reply{status: 200, rid: "1", op: assigned("")}},
		{"assigned with issued chain", "$dps/registrations/res/200/?$rid=1",
			withState(`,"issuedCertificateChain":["` + b64([]byte("ROOT CERT")) + `", "` + b64([]byte("INTERMEDIATE CERT")) + `", "` + b64([]byte("LEAF CERT")) + `"]`),
			reply{status: 200, rid: "1", op: assigned("", "ROOT CERT", "INTERMEDIATE CERT", "LEAF CERT")}},
		{"assigned with null chain", "$dps/registrations/res/200/?$rid=1", withState(`,"issuedCertificateChain":null`),
			reply{status: 200, rid: "1", op: assigned("")}},
		{"connectionProfile null (certificates.md §1)", "$dps/registrations/res/200/?$rid=1", withState(`,"connectionProfile":null`),
			reply{status: 200, rid: "1", op: assigned("")}},
		{"connectionProfile classic", "$dps/registrations/res/200/?$rid=1", withState(`,"connectionProfile":"classic"`),
			reply{status: 200, rid: "1", op: withProfile(assigned(""), "classic")}},
		{"connectionProfile mqttV5 (refused later, by the assignment)", "$dps/registrations/res/200/?$rid=1", withState(`,"connectionProfile":"mqttV5"`),
			reply{status: 200, rid: "1", op: withProfile(assigned(""), "mqttV5")}},
		{"invalid certificate", "$dps/registrations/res/401/?$rid=1",
			`{"errorCode":401002,"trackingId":"8ad0463c-6427-4479-9dfa-3e8bb7003e9b","message":"Invalid certificate.","timestampUtc":"2020-04-10T05:24:22.4718526Z"}`,
			reply{status: 401, rid: "1", fail: &errorBody{ErrorCode: 401002, TrackingID: "8ad0463c-6427-4479-9dfa-3e8bb7003e9b", Message: "Invalid certificate."}}},
		{"disabled", "$dps/registrations/res/200/?$rid=1",
			`{"operationId":"","status":"disabled","registrationState":{"registrationId":"myRegistrationId","status":"disabled"}}`,
			reply{status: 200, rid: "1", op: &operation{Status: "disabled", State: &registrationState{RegistrationID: "myRegistrationId", Status: "disabled"}}}},
		{"allocation failed", "$dps/registrations/res/200/?$rid=1",
			`{"operationId":"4.d0a671905ea5b2c8.42d78160-4c78-479e-8be7-61d5e55dac0d","status":"failed","registrationState":{"registrationId":"myRegistrationId","createdDateTimeUtc":"2020-04-10T03:11:13.0276997Z","status":"failed","errorCode":400207,"errorMessage":"Custom allocation failed with status code: 400","lastUpdatedDateTimeUtc":"2020-04-10T05:24:22.4718526Z","etag":"IjYxMDA4ZDQ2LTAwMDAtMDEwMC0wMDAwLTVlOGZlM2QxMDAwMCI="}}`,
			reply{status: 200, rid: "1", op: &operation{OperationID: opID, Status: "failed", State: &registrationState{
				RegistrationID: "myRegistrationId", Status: "failed", ErrorCode: 400207, ErrorMessage: "Custom allocation failed with status code: 400",
				CreatedAt: created, UpdatedAt: time.Date(2020, 4, 10, 5, 24, 22, 471852600, time.UTC)}}}},
		{"server error (CSDK)", "$dps/registrations/res/500/?$rid=1", `{"errorCode":500000,"message":"boom"}`,
			reply{status: 500, rid: "1", fail: &errorBody{ErrorCode: 500000, Message: "boom"}}},
		{"throttled with retry-after (CSDK)", "$dps/registrations/res/202/?$rid=1&retry-after=8", bodyAssigning,
			reply{status: 202, rid: "1", retryAfter: 8 * time.Second, hasRetryAfter: true, op: &operation{OperationID: opID, Status: "assigning"}}},
		{"throttled (CSDK)", "$dps/registrations/res/429/?$rid=1", `{"errorCode":429001}`,
			reply{status: 429, rid: "1", fail: &errorBody{ErrorCode: 429001}}},
		{"Retry-After capitalised (CS)", "$dps/registrations/res/429/?$rid=9&Retry-After=32", `{"errorCode":429001}`,
			reply{status: 429, rid: "9", retryAfter: 32 * time.Second, hasRetryAfter: true, fail: &errorBody{ErrorCode: 429001}}},
		{"unknown fields and keys ignored", "$dps/registrations/res/202/?$rid=abc&x=y", `{"operationId":"o","status":"unassigned","future":[1,{"a":null}]}`,
			reply{status: 202, rid: "abc", op: &operation{OperationID: "o", Status: "unassigned"}}},
		{"retry-after that is not a number is ignored", "$dps/registrations/res/202/?$rid=1&retry-after=soon", bodyAssigning,
			reply{status: 202, rid: "1", op: &operation{OperationID: opID, Status: "assigning"}}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := parseReply(tt.topic, []byte(tt.body))
			require.NoError(t, err)
			assert.Equal(t, &tt.want, got)
		})
	}
}

func TestParseReplyRejects(t *testing.T) {
	const ok200 = "$dps/registrations/res/200/?$rid=1"
	tests := []struct {
		name, topic, body, want string
	}{
		{"body 123", ok200, `123`, "not a JSON object"},
		{"not our topic", "$dps/registrations/unknown", bodyAssigned, "not a DPS response"},
		{"topic without query", "$dps/registrations/res/200", bodyAssigned, "no query"},
		{"topic without status", "$dps/registrations/res/ok/?$rid=1", bodyAssigned, "no status code"},
		{"topic without $rid", "$dps/registrations/res/200/?retry-after=1", bodyAssigned, "no $rid"},
		{"no operationId and no errorCode", ok200, `{"status":"assigning"}`, "no operationId"},
		{"no status", ok200, `{"operationId":"` + opID + `"}`, "no status"},
		{"error body without errorCode", "$dps/registrations/res/401/?$rid=1", `{"trackingId":"t","message":"Invalid certificate."}`, "without errorCode"},
		{"registrationState 123", ok200, `{"operationId":"` + opID + `","status":"assigning","registrationState":123}`, "registrationState"},
		{"truncated JSON", ok200, bodyAssigned[:len(bodyAssigned)-5], "unexpected EOF"},
		{"assignedHub without deviceId", ok200, strings.Replace(bodyAssigned, `"deviceId":"my-device-id1",`, "", 1), "only one of"},
		{"deviceId without assignedHub", ok200, strings.Replace(bodyAssigned, `"assignedHub":"contoso.azure-devices.net",`, "", 1), "only one of"},
		{"unknown status", ok200, `{"operationId":"` + opID + `","status":"unknown status123!@#"}`, "unknown status"},
		{"unknown status in registrationState", ok200, `{"operationId":"` + opID + `","status":"assigning","registrationState":{"status":"bogus"}}`, "unknown status"},
		{"assigned without a hub", ok200, `{"operationId":"` + opID + `","status":"assigned"}`, "without an assignedHub"},
		{"trailing data", ok200, bodyAssigned + `{}`, "after the JSON object"},
		{"chain not base64", ok200, withState(`,"issuedCertificateChain":["%%%"]`), "not base64"},
		{"connectionProfile not a string", ok200, withState(`,"connectionProfile":{"protocol":"mqttV5"}`), "registrationState"},
		{"empty body", "$dps/registrations/res/429/?$rid=1", ``, "not a JSON object"},
		{"oversized", ok200, withState(`,"payload":"` + strings.Repeat("x", maxReply) + `"`), "limit"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := parseReply(tt.topic, []byte(tt.body))
			require.ErrorIs(t, err, errMalformed)
			assert.Contains(t, err.Error(), tt.want)
		})
	}
}

// FuzzParseResponse checks that no reply crashes the parser and that what it accepts is
// usable: an assignment always names a hub, and a failure always carries an error code.
func FuzzParseResponse(f *testing.F) {
	f.Add("$dps/registrations/res/200/?$rid=1", []byte(bodyAssigned))
	f.Add("$dps/registrations/res/202/?retry-after=120&$rid=1", []byte(bodyAssigning))
	f.Add("$dps/registrations/res/401/?$rid=1", []byte(`{"errorCode":401002,"trackingId":"8ad0463c","message":"Invalid certificate."}`))
	f.Add("$dps/registrations/res/200/?$rid=1", []byte(withState(`,"payload":null,"issuedCertificateChain":["TEVBRg=="]`)))
	f.Fuzz(func(t *testing.T, topic string, body []byte) {
		if r, err := parseReply(topic, body); err == nil {
			checkAccepted(t, r)
		}
	})
}

// TestAssignmentForAnotherDevice: an assignment whose registration state names another
// registration ID is not this device's and is not used; the ID's case does not matter.
func TestAssignmentForAnotherDevice(t *testing.T) {
	rep, err := parseReply("$dps/registrations/res/200/?$rid=1", []byte(bodyAssigned))
	require.NoError(t, err)
	_, err = (&registration{regID: "someone-else"}).handle(rep)
	var e *Error
	require.ErrorAs(t, err, &e)
	assert.True(t, e.Temporary())
	assert.Contains(t, err.Error(), "the assignment is for registration ID 'myRegistrationId', this device is 'someone-else'")

	a, err := (&registration{regID: "myregistrationid"}).handle(rep)
	require.NoError(t, err)
	assert.Equal(t, "contoso.azure-devices.net", a.AssignedHub)
}

// Package sas makes the shared access signatures that symmetric-key devices present to DPS and
// IoT Hub as their MQTT password, and derives a device's key from its enrollment group's. It
// neither stores keys nor checks tokens.
package sas

import (
	"context"
	"crypto/hmac"
	"crypto/sha256"
	"encoding/base64"
	"net/url"
	"strconv"
	"time"
)

// Token is a shared access signature for symmetric-key attestation: the MQTT password
// for DPS (resourceURI "{idScope}/registrations/{registrationId}", keyName "registration")
// and IoT Hub (resourceURI "{host}/devices/{deviceId}", no key name). key is the decoded
// device key; an empty keyName omits skn.
func Token(key []byte, resourceURI string, expiry time.Time, keyName string) string {
	se := strconv.FormatInt(expiry.Unix(), 10)
	mac := hmac.New(sha256.New, key)
	mac.Write([]byte(stringToSign(resourceURI, se)))
	return format(resourceURI, base64.StdEncoding.EncodeToString(mac.Sum(nil)), se, keyName)
}

// Signer makes the HMAC-SHA256 of a token's string to sign with a key it holds: a TPM-held
// identity key (TPM attestation), where the key never leaves the TPM.
type Signer interface {
	Sign(ctx context.Context, data []byte) ([]byte, error)
}

// SignedToken is Token with the signature made by signer.
func SignedToken(ctx context.Context, signer Signer, resourceURI string, expiry time.Time, keyName string) (string, error) {
	se := strconv.FormatInt(expiry.Unix(), 10)
	sig, err := signer.Sign(ctx, []byte(stringToSign(resourceURI, se)))
	if err != nil {
		return "", err
	}
	return format(resourceURI, base64.StdEncoding.EncodeToString(sig), se, keyName), nil
}

// stringToSign is the URL-encoded resource URI, a newline and the expiry in Unix seconds.
func stringToSign(resourceURI, se string) string {
	return url.QueryEscape(resourceURI) + "\n" + se
}

func format(resourceURI, sig, se, keyName string) string {
	s := "SharedAccessSignature sr=" + url.QueryEscape(resourceURI) + "&sig=" + url.QueryEscape(sig) + "&se=" + se
	if keyName != "" {
		s += "&skn=" + url.QueryEscape(keyName)
	}
	return s
}

// DeviceKey is the key of one device in a symmetric-key enrollment group:
// HMAC-SHA256(groupKey, registrationID). Both keys are raw bytes; Azure shows them base64.
func DeviceKey(groupKey []byte, registrationID string) []byte {
	mac := hmac.New(sha256.New, groupKey)
	mac.Write([]byte(registrationID))
	return mac.Sum(nil)
}

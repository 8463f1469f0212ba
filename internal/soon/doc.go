// Package soon is the one way Cairn's tests wait for something to become
// true: they poll a condition until it holds or a deadline passes, instead
// of sleeping for a guessed time. Polling starts fast and backs off, so a
// condition met at once costs nothing and a slow one does not burn a core.
package soon

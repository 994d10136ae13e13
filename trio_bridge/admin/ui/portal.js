// The portal's user page: copy buttons; a key just made is kept for the chat page in this
// tab (sessionStorage) only.
"use strict";
document.querySelectorAll("button.copy").forEach((b) => {
  b.addEventListener("click", () => {
    const text = document.getElementById(b.dataset.copy).textContent;
    navigator.clipboard.writeText(text).then(() => { b.textContent = "Copied"; },
                                             () => { b.textContent = "Select and copy"; });
  });
});
const secret = document.getElementById("secret");
if (secret) sessionStorage.setItem("tb_portal_key", secret.textContent.trim());
